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
import json
import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from fedlowrank.schema import ConfigError

from .gpt2 import GPT2, GPT2Config
from .llama import Llama, LlamaConfig

log = logging.getLogger(__name__)
PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json", *TOKENIZER_FILES]


class PretrainedError(ConfigError):
    """A pretrained checkpoint that cannot be used as it is (raised before any training; exit code 2)."""


def resolve(src: str, cache_dir: str | None = None) -> Path:
    """A local checkpoint directory, or a hub repo id downloaded once (safetensors and JSON files only)."""
    p = Path(src).expanduser()
    if p.is_dir():
        return p
    if p.exists() or src.startswith((".", "/", "~")) or src.count("/") > 1:
        raise PretrainedError(f"model.pretrained={src!r} is neither a checkpoint directory nor a hub repo id")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(src, allow_patterns=HUB_FILES, cache_dir=cache_dir))
    except Exception as e:  # offline, unknown repo, gated model: one clear message
        raise PretrainedError(f"model.pretrained={src!r} is not a local directory, and downloading it from the "
                              f"Hugging Face hub failed ({type(e).__name__}: {str(e)[:300]}); connect once (the "
                              "download is cached) or give a local directory") from e


def read_config(d: Path) -> dict:
    path = d / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PretrainedError(f"{path}: cannot read the checkpoint's config ({e})") from e
    if not isinstance(cfg, dict):
        raise PretrainedError(f"{path}: expected a JSON object")
    return cfg


def weight_files(d: Path) -> list[Path]:
    """The safetensors files holding the weights: ``model.safetensors``, or every shard the index names (files
    inside ``d`` only). A directory with pickle weights only is refused: they are never unpickled."""
    single, index = d / "model.safetensors", d / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
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


def read_weights(d: Path) -> dict[str, Tensor]:
    """Every tensor of the checkpoint's safetensors file(s)."""
    from safetensors.torch import load_file

    out: dict[str, Tensor] = {}
    for f in weight_files(d):
        out.update(load_file(str(f)))
    return out


def model_config(d: Path) -> tuple[str, GPT2Config | LlamaConfig]:
    """(arch, config) of the checkpoint in ``d``, refusing what cannot be represented (naming the field)."""
    cfg = read_config(d)
    arch = arch_of(cfg)
    try:
        return arch, (gpt2_config(cfg) if arch == "gpt2" else llama_config(cfg))
    except KeyError as e:
        raise PretrainedError(f"{d / 'config.json'}: missing field {e}") from e


def _refuse(cfg: dict, field: str, ok, why: str) -> None:
    value = cfg.get(field)
    if not (ok(value) if callable(ok) else value == ok):
        raise PretrainedError(f"config.json: {field}={value!r} cannot be represented here ({why})")


def gpt2_config(cfg: dict) -> GPT2Config:
    """GPT-2's ``config.json`` as a :class:`GPT2Config`, refusing what this GPT-2 does not implement."""
    d = cfg["n_embd"]
    _refuse(cfg, "activation_function", lambda v: v in (None, "gelu_new", "gelu_pytorch_tanh"), "tanh GELU only")
    _refuse(cfg, "n_inner", lambda v: v in (None, 4 * d), "the MLP is 4 x n_embd")
    _refuse(cfg, "tie_word_embeddings", lambda v: v in (None, True), "lm_head is tied to wte")
    _refuse(cfg, "scale_attn_weights", lambda v: v in (None, True), "attention is scaled by 1/sqrt(head dim)")
    _refuse(cfg, "scale_attn_by_inverse_layer_idx", lambda v: not v, "no per-layer attention scaling")
    _refuse(cfg, "add_cross_attention", lambda v: not v, "decoder only")
    return GPT2Config(vocab_size=cfg["vocab_size"], block_size=cfg["n_positions"], n_layer=cfg["n_layer"],
                      n_head=cfg["n_head"], n_embd=d, ln_eps=float(cfg.get("layer_norm_epsilon", 1e-5)))


def llama_config(cfg: dict) -> LlamaConfig:
    """LLaMA's (or Mistral's, without a sliding window) ``config.json`` as a :class:`LlamaConfig`."""
    heads, dim = cfg["num_attention_heads"], cfg["hidden_size"]
    rope = cfg.get("rope_parameters") or {}
    _refuse(cfg, "hidden_act", lambda v: v in (None, "silu"), "SwiGLU with SiLU")
    _refuse(cfg, "attention_bias", lambda v: not v, "LLaMA's projections have no biases")
    _refuse(cfg, "mlp_bias", lambda v: not v, "LLaMA's projections have no biases")
    _refuse(cfg, "rope_scaling", lambda v: not v or v.get("rope_type", v.get("type")) == "default",
            "plain RoPE only")
    _refuse(cfg, "rope_parameters", lambda v: not v or v.get("rope_type", "default") == "default", "plain RoPE only")
    _refuse(cfg, "head_dim", lambda v: v in (None, dim // heads), "head_dim = hidden_size / num_attention_heads")
    _refuse(cfg, "sliding_window", lambda v: v is None, "full causal attention only")
    return LlamaConfig(vocab_size=cfg["vocab_size"], block_size=cfg.get("max_position_embeddings", 2048),
                       n_layer=cfg["num_hidden_layers"], n_head=heads, dim=dim, hidden_dim=cfg["intermediate_size"],
                       n_kv_head=cfg.get("num_key_value_heads") or heads,
                       rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
                       norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                       tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))


def arch_of(cfg: dict) -> str:
    kind = cfg.get("model_type")
    if kind == "gpt2":
        return "gpt2"
    if kind in ("llama", "mistral"):
        return "llama"
    raise PretrainedError(f"config.json: model_type={kind!r} is not supported (gpt2, llama, mistral)")


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


def _take(sd: dict[str, Tensor], name: str, shape: torch.Size) -> Tensor:
    if name not in sd:
        raise PretrainedError(f"the checkpoint has no tensor {name!r}")
    t = sd[name]
    if t.shape != shape:
        raise PretrainedError(f"tensor {name!r} has shape {tuple(t.shape)}; config.json implies {tuple(shape)}")
    return t.float()


def load_hf_state(model: nn.Module, sd: dict[str, Tensor]) -> None:
    """Copy HF-named tensors into a freshly built dense GPT-2 / LLaMA of the same config."""
    own = model.state_dict()
    new: dict[str, Tensor] = {}
    if isinstance(model, GPT2):
        for ours, (theirs, conv) in _gpt2_names(model.config.n_layer).items():
            t = _take(sd, theirs, own[ours].shape[::-1] if conv else own[ours].shape)
            new[ours] = t.t().contiguous() if conv else t
        new["lm_head.weight"] = new["wte.weight"]
    else:
        c: LlamaConfig = model.config
        for ours, theirs in _llama_names(c.n_layer, c.tie_embeddings).items():
            t = _take(sd, theirs, own[ours].shape)
            if ours.endswith(("q_proj.weight", "k_proj.weight")):
                t = _halves_to_pairs(t, c.n_head if "q_proj" in ours else (c.n_kv_head or c.n_head))
            new[ours] = t
        if c.tie_embeddings:
            new["lm_head.weight"] = new["embed.weight"]
    model.load_state_dict(new, strict=True)


def load_pretrained(src: str, cache_dir: str | None = None, **overrides) -> tuple[nn.Module, Path]:
    """(dense model with the checkpoint's weights, checkpoint directory). Refuses before building anything big
    when the config cannot be represented. ``overrides``: config fields that do not change the weights
    (e.g. GPT-2's ``dropout``)."""
    d = resolve(src, cache_dir)
    arch, mc = model_config(d)
    mc = dataclasses.replace(mc, **overrides)
    sd = read_weights(d)
    model: nn.Module = GPT2(mc) if arch == "gpt2" else Llama(mc)  # type: ignore[arg-type]
    load_hf_state(model, sd)
    log.info("loaded %s (%s, %d layers, %d parameters) from %s", src, arch, mc.n_layer,
             sum(p.numel() for p in model.parameters()), d)
    return model, d


def hf_config(model: nn.Module) -> dict:
    """``config.json`` for ``transformers``' ``GPT2LMHeadModel`` / ``LlamaForCausalLM`` of a dense model."""
    c = model.config
    if isinstance(model, GPT2):
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
                "n_positions": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head,
                "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": c.ln_eps,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "tie_word_embeddings": True,
                "bos_token_id": None, "eos_token_id": None, "torch_dtype": "float32"}
    if isinstance(model, Llama):
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c.vocab_size,
                "hidden_size": c.dim, "intermediate_size": c.hidden_dim, "num_hidden_layers": c.n_layer,
                "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head or c.n_head,
                "head_dim": c.dim // c.n_head, "max_position_embeddings": c.block_size, "rms_norm_eps": c.norm_eps,
                "rope_theta": c.rope_theta, "rope_scaling": None, "hidden_act": "silu", "attention_bias": False,
                "mlp_bias": False, "tie_word_embeddings": c.tie_embeddings, "bos_token_id": None,
                "eos_token_id": None, "torch_dtype": "float32"}
    raise TypeError(f"cannot export a {type(model).__name__} (GPT2 or Llama only)")


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


__all__ = ["PretrainedError", "arch_of", "gpt2_config", "hf_config", "hf_state", "llama_config", "load_hf_state",
           "load_pretrained", "model_config", "read_config", "read_weights", "resolve", "save_hf", "weight_files"]
