"""Export a central run, a checkpoint, or a Hugging Face directory as a directory that ``transformers``'
``AutoModelForCausalLM.from_pretrained`` loads: ``config.json``, ``model.safetensors`` and, where the run had
them, the tokenizer files. Factorized layers (fixed rank, InRank, WeLore's LRCs) and LoRA adapters (ReLoRA, and
the global adapter of a federated ``method=lora`` run) are merged to dense weights first, so any tool can use the
result.

    python -m fedlowrank.export <run dir | checkpoint dir | HF dir> <out dir>
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

from fedlowrank.checkpoint import CheckpointError, latest_complete, load_tensors, read_json
from fedlowrank.models.gpt2 import GPT2, GPT2Config
from fedlowrank.models.hf import TOKENIZER_FILES, PretrainedError, load_pretrained, save_hf
from fedlowrank.models.hf_config import checked_config
from fedlowrank.models.llama import Llama, LlamaConfig

log = logging.getLogger("fedlowrank.export")


def _merges(sd: dict[str, Tensor]) -> dict[str, tuple[str, str, str | None]]:
    """``X.weight`` -> (U, V, base weight or None) for every low-rank form in ``sd``: ``X.U, X.V`` and LoRA's
    ``X.base.weight + s·X.adapter.U·X.adapter.V``."""
    out: dict[str, tuple[str, str, str | None]] = {}
    for key in sd:
        if key.endswith(".adapter.U"):
            x = key[: -len(".adapter.U")]
            out[f"{x}.weight"] = (key, f"{x}.adapter.V", f"{x}.base.weight")
        elif key.endswith(".U") and f"{key[:-2]}.V" in sd:
            out[f"{key[:-2]}.weight"] = (key, f"{key[:-2]}.V", None)
    return out


def _consumed(x: str) -> set[str]:
    return {f"{x}.U", f"{x}.V", f"{x}.adapter.U", f"{x}.adapter.V", f"{x}.base.weight", f"{x}.base.bias",
            f"{x}.scaling", f"{x}.scale_param"}


def dense_shapes(sd: dict[str, Tensor]) -> dict[str, tuple[int, ...]]:
    """The shapes :func:`dense_state` would produce, computed without multiplying anything (``()`` where a factor
    pair cannot be merged: not 2-D, inner sizes differ, a LoRA base of another shape or a scale that is no scalar)."""
    done: set[str] = set()
    out: dict[str, tuple[int, ...]] = {}
    for w, (u, v, base) in _merges(sd).items():
        U, V = sd[u], sd.get(v)
        ok = V is not None and U.dim() == V.dim() == 2 and U.shape[1] == V.shape[0]
        shape = (U.shape[0], V.shape[1]) if ok else ()  # type: ignore[union-attr]
        if base is not None:
            x = w[: -len(".weight")]
            scale = sd.get(f"{x}.scale_param", sd.get(f"{x}.scaling"))
            if base not in sd or tuple(sd[base].shape) != shape or scale is None or scale.numel() != 1:
                shape = ()
            if f"{x}.base.bias" in sd:
                out[f"{x}.bias"] = tuple(sd[f"{x}.base.bias"].shape)
        out[w] = shape
        done |= _consumed(w[: -len(".weight")])
    out.update({k: tuple(t.shape) for k, t in sd.items() if k not in done and k not in out})
    return out


def dense_state(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """A checkpoint's state with every low-rank form merged: ``X.U, X.V`` -> ``X.weight = U·V``;
    ``X.base.weight + s·X.adapter.U·X.adapter.V`` -> ``X.weight`` (s = ``X.scaling``, or tanh(``X.scale_param``))."""
    out: dict[str, Tensor] = {}
    done: set[str] = set()
    for w, (u, v, base) in _merges(sd).items():
        x = w[: -len(".weight")]
        prod = sd[u].float() @ sd[v].float()
        if base is not None:
            s = torch.tanh(sd[f"{x}.scale_param"]) if f"{x}.scale_param" in sd else sd[f"{x}.scaling"]
            prod = sd[base].float() + s.float() * prod
            if f"{x}.base.bias" in sd:
                out[f"{x}.bias"] = sd[f"{x}.base.bias"].float()
        out[w] = prod
        done |= _consumed(x)
    out.update({k: v.float() for k, v in sd.items() if k not in done and k not in out})
    return out


def _model_from_meta(meta: dict, sd: dict[str, Tensor], where: str) -> nn.Module:
    """The dense architecture a checkpoint was trained with (``model_config`` in its meta; older checkpoints: the
    named size, with the vocabulary and GPT-2's positions read from the weights), built only after every stored
    tensor's merged shape matches it (the config and the shapes are checked on a meta-device skeleton)."""
    arch, cfg = meta.get("arch"), meta.get("model_config")
    if arch not in ("gpt2", "llama"):
        raise PretrainedError(f"{where}: checkpoint arch {str(arch)[:40]!r} is not a GPT-2 or LLaMA run: export and "
                              "sampling take those only")
    if not cfg:
        emb = sd.get("wte.weight" if arch == "gpt2" else "embed.weight")
        try:
            kw = {"vocab_size": emb.shape[0]} | ({"block_size": sd["wpe.weight"].shape[0]} if arch == "gpt2" else {})
            cls = GPT2Config if arch == "gpt2" else LlamaConfig
            cfg = dataclasses.asdict(cls.from_size(meta["size"], **kw))  # type: ignore[union-attr]
        except (AttributeError, IndexError, KeyError, TypeError, ValueError) as e:
            raise PretrainedError(f"{where}: no model_config, and no known size with embeddings to read the "
                                  f"vocabulary from ({type(e).__name__}: {str(e)[:100]})") from None
    mc = checked_config(arch, cfg, where)
    build = GPT2 if arch == "gpt2" else Llama
    try:
        with torch.device("meta"):
            want = {k: tuple(v.shape) for k, v in build(mc).state_dict().items()}  # type: ignore[arg-type]
    except ValueError as e:
        raise PretrainedError(f"{where}: model_config {e}") from None
    have = dense_shapes(sd)
    tied = [k for k in ("lm_head.weight",) if k in want and k not in have]
    bad = sorted(k for k in want.keys() - set(tied) if have.get(k) != want[k]) + sorted(have.keys() - want.keys())
    if bad:
        k = bad[0]
        raise PretrainedError(f"{where}: the stored weights do not match model_config: {k!r} "
                              f"{'is missing' if k not in have else f'merges to {list(have[k])}'}"
                              f"{f', expected {list(want[k])}' if k in want else ' (unexpected)'}"
                              f"{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}")
    return build(mc)  # type: ignore[arg-type]


def find_checkpoint(src: Path) -> Path:
    """A checkpoint directory from a run directory, a checkpoint root, or the directory itself."""
    for cand in (src, src / "checkpoints"):
        if (cand / "meta.json").is_file() and (cand / "model.safetensors").is_file():
            return cand
        if cand.is_dir() and (found := latest_complete(cand)) is not None:
            return found
    raise PretrainedError(f"{src}: no complete checkpoint (a run directory, its checkpoints/, one step-* "
                          "directory, or a Hugging Face directory with config.json)")


def load_any(src: Path) -> tuple[nn.Module, int, Path | None]:
    """(dense model, parameters of the stored form, directory holding the tokenizer files or None)."""
    if (src / "config.json").is_file() and not (src / "meta.json").is_file():
        model, d = load_pretrained(str(src))
        return model, sum(p.numel() for p in model.parameters()), d
    from fedlowrank.federated.lora_export import is_lora_run, merged_lora_run

    if is_lora_run(src):  # a federated LoRA run: its checkpoint's base with the global adapter merged
        return merged_lora_run(src)
    ckpt = find_checkpoint(src)
    meta, sd = read_json(ckpt / "meta.json"), load_tensors(ckpt / "model.safetensors")
    if not isinstance(meta, dict):
        raise PretrainedError(f"{ckpt / 'meta.json'}: expected a JSON object")
    stored = sum(v.numel() for k, v in sd.items() if v.is_floating_point() and not k.endswith(".scaling"))
    model = _model_from_meta(meta, sd, str(ckpt / "meta.json"))
    dense = dense_state(sd)
    if getattr(model, "lm_head", None) is not None and "lm_head.weight" not in dense:  # tied: stored once
        dense["lm_head.weight"] = dense["wte.weight" if isinstance(model, GPT2) else "embed.weight"]
    model.load_state_dict(dense, strict=True)
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    tok = next((d for d in (run_dir / "tokenizer", ckpt / "tokenizer") if (d / "tokenizer.json").is_file()), None)
    return model, stored, tok


def export(src: str | Path, out: str | Path) -> dict:
    """Write the HF directory; returns a summary (parameters stored vs dense, files written)."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise PretrainedError(f"{src} is not a directory")
    model, stored, tok = load_any(src)
    save_hf(model, out)
    copied = []
    for name in TOKENIZER_FILES if tok is not None else ():
        if (tok / name).is_file():
            shutil.copyfile(tok / name, out / name)
            copied.append(name)
    dense = sum(p.numel() for p in model.parameters())
    summary = {"source": str(src), "out": str(out), "arch": type(model).__name__, "params_stored": stored,
               "params_dense": dense, "tokenizer_files": copied}
    log.info("exported %s to %s: %s, %d parameters as stored (low-rank form) -> %d dense (%.3fx); tokenizer: %s",
             src, out, summary["arch"], stored, dense, stored / dense, ", ".join(copied) or "none in the run")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fedlowrank.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="a central or federated LoRA run directory, a checkpoint directory, or a Hugging Face "
                                "directory")
    ap.add_argument("out", help="the directory to write (created)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        export(args.src, args.out)
    except (PretrainedError, CheckpointError) as e:
        log.error("export failed: %s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
