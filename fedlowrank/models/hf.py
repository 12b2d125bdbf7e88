"""Hugging Face checkpoints in and out: ``config.json`` to :class:`GPT2Config` / :class:`LlamaConfig` and back, and
``*.safetensors`` weights (one file, or shards through ``model.safetensors.index.json``) to this project's GPT-2
and LLaMA and back. Nothing is ever unpickled: a checkpoint holding only ``pytorch_model.bin`` is refused.

Weight layouts that differ from Hugging Face's:
- GPT-2's ``Conv1D`` stores weights as (in, out); ``nn.Linear`` here stores (out, in): transposed both ways.
- LLaMA's RoPE here rotates interleaved pairs; HF's rotates halves. Within each head, HF row ``s·hd/2 + i`` is row
  ``2i + s`` here (q and k only): :func:`_halves_to_pairs` on load, :func:`_pairs_to_halves` on export.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from fedlowrank.tensorfile import FLOAT_DTYPES, TensorFileError, TensorInfo, load_checked, read_header

from .gpt2 import GPT2, GPT2Config
from .hf_config import (PretrainedError, arch_of, gpt2_config, llama_config, model_config, read_config,
                        to_hf_config)
from .llama import Llama, LlamaConfig

log = logging.getLogger(__name__)
PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# tensors a checkpoint may hold beyond the weights: GPT-2's causal-mask buffers and a tied head saved anyway,
# LLaMA's RoPE frequencies (older checkpoints) and a tied head; transformers ignores them too
IGNORED = {"gpt2": re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$|^lm_head\.weight$"),
           "llama": re.compile(r"(^|\.)rotary_emb\.inv_freq$|^lm_head\.weight$")}
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json", *TOKENIZER_FILES]


def resolve(src: str, cache_dir: str | None = None) -> Path:
    """A local checkpoint directory, or a hub repo id downloaded once (safetensors and JSON files only)."""
    p = Path(src).expanduser()
    if p.is_dir():
        return p
    if p.exists() or src.startswith((".", "/", "~")) or src.count("/") > 1:
        raise PretrainedError(f"model.pretrained={src!r} is neither a checkpoint directory nor a hub repo id")
    try:
        return _hub_snapshot(src, cache_dir)
    except Exception as e:  # offline, unknown repo, gated model: one clear message
        raise PretrainedError(f"model.pretrained={src!r} is not a local directory, and downloading it from the "
                              f"Hugging Face hub failed ({type(e).__name__}: {str(e)[:300]}); connect once (the "
                              "download is cached) or give a local directory") from e


@functools.lru_cache(maxsize=16)
def _hub_snapshot(src: str, cache_dir: str | None) -> Path:
    """A hub repo's local snapshot, asked of the hub once per process (a federated run resolves its checkpoint for
    every client's data and model; a failure is not cached)."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(src, allow_patterns=HUB_FILES, cache_dir=cache_dir))


def weight_files(d: Path) -> list[Path]:
    """The safetensors files holding the weights: ``model.safetensors``, or every shard the index names (files
    inside ``d`` only). A directory with pickle weights only is refused: they are never unpickled."""
    single, index = d / "model.safetensors", d / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError, TypeError, RecursionError) as e:
            raise PretrainedError(f"{index}: not a safetensors index ({e})") from e
        for name in shards:
            if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors") \
                    or not (d / name).is_file():
                raise PretrainedError(f"{index}: shard {name!r} is not a .safetensors file in {d}")
        return [d / name for name in shards]
    if any(next(d.glob(g), None) for g in PICKLES):
        raise PretrainedError(f"{d} holds only pickle weights (e.g. pytorch_model.bin), which are never unpickled "
                              "here (they can run code); convert the checkpoint to safetensors first")
    raise PretrainedError(f"{d} has no model.safetensors or model.safetensors.index.json")


def _halves_to_pairs(w: Tensor, n_heads: int) -> Tensor:
    """(n_heads·hd, in) rows from HF's rotate-half order to the interleaved-pair order."""
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, hd // 2, -1).transpose(1, 2).reshape(w.shape)


def _pairs_to_halves(w: Tensor, n_heads: int) -> Tensor:
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, hd // 2, 2, -1).transpose(1, 2).reshape(w.shape)


def _gpt2_names(n_layer: int) -> dict[str, tuple[str, bool]]:
    """Our name -> (HF name, transposed)."""
    out = {"wte.weight": ("transformer.wte.weight", False), "wpe.weight": ("transformer.wpe.weight", False),
           "ln_f.weight": ("transformer.ln_f.weight", False), "ln_f.bias": ("transformer.ln_f.bias", False)}
    for i in range(n_layer):
        for mod, conv in (("ln_1", False), ("ln_2", False), ("attn.c_attn", True), ("attn.c_proj", True),
                          ("mlp.c_fc", True), ("mlp.c_proj", True)):
            out[f"h.{i}.{mod}.weight"] = (f"transformer.h.{i}.{mod}.weight", conv)
            out[f"h.{i}.{mod}.bias"] = (f"transformer.h.{i}.{mod}.bias", False)
    return out


def _llama_names(n_layer: int, tied: bool) -> dict[str, str]:
    out = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not tied:
        out["lm_head.weight"] = "lm_head.weight"
    for i in range(n_layer):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        out |= {p + "attn_norm.weight": q + "input_layernorm.weight",
                p + "mlp_norm.weight": q + "post_attention_layernorm.weight"}
        out |= {f"{p}attn.{n}.weight": f"{q}self_attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        out |= {f"{p}mlp.{n}.weight": f"{q}mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")}
    return out


def hf_names(arch: str, mc: GPT2Config | LlamaConfig) -> dict[str, tuple[str, bool]]:
    """Our state-dict name -> (HF name, stored transposed) of every tensor the config implies."""
    if arch == "gpt2":
        return _gpt2_names(mc.n_layer)
    return {ours: (theirs, False) for ours, theirs in _llama_names(mc.n_layer, mc.tie_embeddings).items()}  # type: ignore


def read_headers(d: Path) -> dict[str, tuple[Path, TensorInfo]]:
    """Every tensor the checkpoint's safetensors file(s) declare -> (file, header entry); headers only."""
    out: dict[str, tuple[Path, TensorInfo]] = {}
    for f in weight_files(d):
        try:
            tensors, _ = read_header(f)
        except TensorFileError as e:
            raise PretrainedError(str(e)) from None
        for name, info in tensors.items():
            if name in out:
                raise PretrainedError(f"{f}: tensor {name!r} is also in {out[name][0].name}")
            out[name] = (f, info)
    return out


def _listed(names: list[str]) -> str:
    return ", ".join(map(repr, names[:5])) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _layer_hint(header: dict, n_layer: int, field: str) -> str:
    held = {int(m.group(1)) for k in header if (m := re.search(r"(?:^|\.)(?:h|layers)\.(\d+)\.", k))}
    return f" (the checkpoint holds {len(held)} layers, {field}={n_layer})" if len(held) != n_layer else ""


def check_tensors(d: Path, arch: str, mc: GPT2Config | LlamaConfig) -> dict[str, tuple[Path, str]]:
    """Compare the checkpoint's safetensors headers with what ``config.json`` implies, before anything is
    allocated: every expected tensor present, none unexpected (beyond known buffers), shapes equal, float dtypes.
    Returns HF name -> (file, name stored there)."""
    header, cfg_path = read_headers(d), d / "config.json"
    names = hf_names(arch, mc)
    strip = arch == "gpt2" and "wte.weight" in header and "transformer.wte.weight" not in header  # GPT2Model's names
    stored = {theirs: theirs.removeprefix("transformer.") if strip else theirs for theirs, _ in names.values()}
    missing = sorted(n for n in stored.values() if n not in header)
    extra = sorted(k for k in header.keys() - set(stored.values()) if not IGNORED[arch].search(k))
    if missing or extra:
        hint = _layer_hint(header, mc.n_layer, "n_layer" if arch == "gpt2" else "num_hidden_layers")
        parts = ([f"missing tensors {_listed(missing)}"] if missing else []) + \
                ([f"unexpected tensors {_listed(extra)}"] if extra else [])
        raise PretrainedError(f"{d}: the weights do not match {cfg_path}{hint}: {'; '.join(parts)}")
    with torch.device("meta"):  # shapes only: nothing is allocated
        own = (GPT2(mc) if arch == "gpt2" else Llama(mc)).state_dict()  # type: ignore[arg-type]
    for ours, (theirs, conv) in names.items():
        f, info = header[stored[theirs]]
        want = tuple(own[ours].shape[::-1] if conv else own[ours].shape)
        if info.shape != want:
            raise PretrainedError(f"{f}: tensor {stored[theirs]!r} has shape {list(info.shape)}; {cfg_path} implies "
                                  f"{list(want)}")
        if info.dtype not in FLOAT_DTYPES:
            raise PretrainedError(f"{f}: tensor {stored[theirs]!r} is {info.dtype}; weights must be F16, BF16, F32 "
                                  "or F64")
    return {theirs: (header[name][0], name) for theirs, name in stored.items()}


def read_weights(where: dict[str, tuple[Path, str]]) -> dict[str, Tensor]:
    """HF name -> tensor, read from the files :func:`check_tensors` accepted."""
    by_file: dict[Path, dict[str, str]] = {}
    for theirs, (f, name) in where.items():
        by_file.setdefault(f, {})[name] = theirs
    out: dict[str, Tensor] = {}
    for f, names in by_file.items():
        try:
            got = load_checked(f, set(names))
        except TensorFileError as e:
            raise PretrainedError(str(e)) from None
        out.update({names[k]: v for k, v in got.items()})
    return out


def load_hf_state(model: nn.Module, sd: dict[str, Tensor]) -> None:
    """Copy HF-named tensors (shapes already checked) into a freshly built dense GPT-2 / LLaMA of the same config."""
    new: dict[str, Tensor] = {}
    if isinstance(model, GPT2):
        for ours, (theirs, conv) in _gpt2_names(model.config.n_layer).items():
            new[ours] = sd[theirs].float().t().contiguous() if conv else sd[theirs].float()
        new["lm_head.weight"] = new["wte.weight"]
    else:
        c: LlamaConfig = model.config
        for ours, theirs in _llama_names(c.n_layer, c.tie_embeddings).items():
            t = sd[theirs].float()
            if ours.endswith(("q_proj.weight", "k_proj.weight")):
                t = _halves_to_pairs(t, c.n_head if "q_proj" in ours else (c.n_kv_head or c.n_head))
            new[ours] = t
        if c.tie_embeddings:
            new["lm_head.weight"] = new["embed.weight"]
    model.load_state_dict(new, strict=True)


def load_pretrained(src: str, cache_dir: str | None = None, **overrides) -> tuple[nn.Module, Path]:
    """(dense model with the checkpoint's weights, checkpoint directory). ``config.json`` is checked field by
    field and against the safetensors headers before any tensor or module is allocated. ``overrides``: config
    fields that do not change the weights (e.g. GPT-2's ``dropout``)."""
    d = resolve(src, cache_dir)
    arch, mc = model_config(d)
    mc = dataclasses.replace(mc, **overrides)
    sd = read_weights(check_tensors(d, arch, mc))
    model: nn.Module = GPT2(mc) if arch == "gpt2" else Llama(mc)  # type: ignore[arg-type]
    load_hf_state(model, sd)
    log.info("loaded %s (%s, %d layers, %d parameters) from %s", src, arch, mc.n_layer,
             sum(p.numel() for p in model.parameters()), d)
    return model, d


def hf_config(model: nn.Module) -> dict:
    """``config.json`` for ``transformers``' ``GPT2LMHeadModel`` / ``LlamaForCausalLM`` of a dense model."""
    if not isinstance(model, (GPT2, Llama)):
        raise TypeError(f"cannot export a {type(model).__name__} (GPT2 or Llama only)")
    return to_hf_config(model.config)


def hf_state(model: nn.Module) -> dict[str, Tensor]:
    """The dense model's weights under HF names and layouts (tied heads stored once, as HF saves them)."""
    own = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    if isinstance(model, GPT2):
        return {theirs: (own[ours].t() if conv else own[ours]).contiguous()
                for ours, (theirs, conv) in _gpt2_names(model.config.n_layer).items()}
    c: LlamaConfig = model.config
    out = {}
    for ours, theirs in _llama_names(c.n_layer, c.tie_embeddings).items():
        t = own[ours]
        if ours.endswith(("q_proj.weight", "k_proj.weight")):
            t = _pairs_to_halves(t, c.n_head if "q_proj" in ours else (c.n_kv_head or c.n_head))
        out[theirs] = t.contiguous()
    return out


def save_hf(model: nn.Module, out: Path) -> None:
    """``out/config.json`` and ``out/model.safetensors`` that ``AutoModelForCausalLM.from_pretrained`` loads."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config(model), indent=2))
    save_file(hf_state(model), str(out / "model.safetensors"), metadata={"format": "pt"})


__all__ = ["IGNORED", "PretrainedError", "arch_of", "check_tensors", "gpt2_config", "hf_config", "hf_names", "hf_state",
           "llama_config", "load_hf_state", "load_pretrained", "model_config", "read_config", "read_headers",
           "read_weights", "resolve", "save_hf", "weight_files"]
