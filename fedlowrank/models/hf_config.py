"""Hugging Face ``config.json`` to :class:`GPT2Config` / :class:`LlamaConfig` and back, checked field by field
before anything is built: every size is an integer in ``[1, bound]`` (:data:`BOUNDS`, far above any published
GPT-2/LLaMA-family model), epsilons and RoPE's theta are finite and positive, heads divide the width and
key/value heads divide the heads, and what this project does not implement is refused naming the field.
The checkpoint's tensors are compared with the config afterwards (:mod:`fedlowrank.models.hf`)."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from fedlowrank.schema import ConfigError

from .gpt2 import GPT2Config
from .llama import LlamaConfig


class PretrainedError(ConfigError):
    """A pretrained checkpoint that cannot be used as it is (raised before any training; exit code 2)."""


# sane bounds (largest published values: vocabulary 262k, width 16k (LLaMA-3 405B: 16,384), MLP 53k, 126 layers,
# 128 heads, 10M positions); a config beyond them is refused whatever its checkpoint holds
BOUNDS = {"vocab_size": 1 << 24, "n_positions": 1 << 24, "max_position_embeddings": 1 << 24, "n_embd": 1 << 16,
          "hidden_size": 1 << 16, "n_inner": 1 << 18, "intermediate_size": 1 << 18, "n_layer": 1024,
          "num_hidden_layers": 1024, "n_head": 1024, "num_attention_heads": 1024, "num_key_value_heads": 1024,
          "head_dim": 1 << 12}
BOUNDS |= {"block_size": BOUNDS["n_positions"], "dim": BOUNDS["hidden_size"], "hidden_dim": BOUNDS["intermediate_size"],
           "n_kv_head": BOUNDS["num_key_value_heads"]}  # the same bounds under this project's field names
_REQUIRED = object()


def read_config(d: Path) -> dict:
    """``d/config.json`` as a dict (a JSON object), or a :class:`PretrainedError` naming the file."""
    path = d / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except RecursionError:
        raise PretrainedError(f"{path}: JSON nested too deeply") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PretrainedError(f"{path}: cannot read the checkpoint's config ({e})") from None
    if not isinstance(cfg, dict):
        raise PretrainedError(f"{path}: expected a JSON object")
    return cfg


def size(cfg: dict, field: str, where: str, default: Any = _REQUIRED) -> int:
    """``cfg[field]`` as a size: an integer in [1, BOUNDS[field]] (``default`` when absent or null)."""
    v = cfg.get(field)
    if v is None:
        if default is _REQUIRED:
            raise PretrainedError(f"{where}: missing field {field!r}")
        return default
    if type(v) is not int or not 1 <= v <= BOUNDS[field]:
        raise PretrainedError(f"{where}: {field}={repr(v)[:40]} must be an integer in [1, {BOUNDS[field]:,}]")
    return v


def positive(cfg: dict, field: str, where: str, default: float) -> float:
    """``cfg[field]`` as a finite positive number (``default`` when absent or null)."""
    v = cfg.get(field)
    if v is None:
        return default
    if type(v) not in (int, float) or not (math.isfinite(v) and v > 0):
        raise PretrainedError(f"{where}: {field}={repr(v)[:40]} must be a finite positive number")
    return float(v)


def refuse(cfg: dict, field: str, ok, why: str, where: str = "config.json") -> None:
    value = cfg.get(field)
    if not ok(value):
        raise PretrainedError(f"{where}: {field}={str(value)[:80]!r} cannot be represented here ({why})")


def _switch(v: Any) -> bool:
    return v is None or isinstance(v, bool)


def gpt2_config(cfg: dict, where: str = "config.json") -> GPT2Config:
    """GPT-2's ``config.json`` as a :class:`GPT2Config`, refusing what this GPT-2 does not implement."""
    d, heads = size(cfg, "n_embd", where), size(cfg, "n_head", where)
    if d % heads:
        raise PretrainedError(f"{where}: n_head={heads} does not divide n_embd={d}")
    refuse(cfg, "activation_function", lambda v: v in (None, "gelu_new", "gelu_pytorch_tanh"), "tanh GELU only", where)
    refuse(cfg, "n_inner", lambda v: v is None or (type(v) is int and v == 4 * d), "the MLP is 4 x n_embd", where)
    for field, ok, why in (("tie_word_embeddings", True, "lm_head is tied to wte"),
                           ("scale_attn_weights", True, "attention is scaled by 1/sqrt(head dim)"),
                           ("scale_attn_by_inverse_layer_idx", False, "no per-layer attention scaling"),
                           ("add_cross_attention", False, "decoder only")):
        refuse(cfg, field, lambda v, ok=ok: v is None or v is ok, why, where)
    return GPT2Config(vocab_size=size(cfg, "vocab_size", where), block_size=size(cfg, "n_positions", where),
                      n_layer=size(cfg, "n_layer", where), n_head=heads, n_embd=d,
                      ln_eps=positive(cfg, "layer_norm_epsilon", where, 1e-5))


def _plain_scaling(v: Any) -> bool:
    return not v or (isinstance(v, dict) and v.get("rope_type", v.get("type")) == "default")


def _plain_rope(v: Any) -> bool:
    return not v or (isinstance(v, dict) and v.get("rope_type", "default") == "default")


def llama_config(cfg: dict, where: str = "config.json") -> LlamaConfig:
    """LLaMA's (or Mistral's, without a sliding window) ``config.json`` as a :class:`LlamaConfig`."""
    heads, dim = size(cfg, "num_attention_heads", where), size(cfg, "hidden_size", where)
    kv = size(cfg, "num_key_value_heads", where, heads)
    if dim % heads or (dim // heads) % 2:
        raise PretrainedError(f"{where}: num_attention_heads={heads} must divide hidden_size={dim} into an even "
                              "head size (RoPE rotates pairs)")
    if heads % kv:
        raise PretrainedError(f"{where}: num_key_value_heads={kv} must divide num_attention_heads={heads}")
    refuse(cfg, "hidden_act", lambda v: v in (None, "silu"), "SwiGLU with SiLU", where)
    for field in ("attention_bias", "mlp_bias"):
        refuse(cfg, field, lambda v: v is None or v is False, "LLaMA's projections have no biases", where)
    refuse(cfg, "rope_scaling", _plain_scaling, "plain RoPE only", where)
    refuse(cfg, "rope_parameters", _plain_rope, "plain RoPE only", where)
    refuse(cfg, "head_dim", lambda v: v in (None, dim // heads), "head_dim = hidden_size / num_attention_heads", where)
    refuse(cfg, "sliding_window", lambda v: v is None, "full causal attention only", where)
    refuse(cfg, "tie_word_embeddings", _switch, "true or false", where)
    rope = cfg.get("rope_parameters") or {}
    theta = positive(rope, "rope_theta", f"{where} (rope_parameters)", positive(cfg, "rope_theta", where, 10000.0))
    return LlamaConfig(vocab_size=size(cfg, "vocab_size", where),
                       block_size=size(cfg, "max_position_embeddings", where, 2048),
                       n_layer=size(cfg, "num_hidden_layers", where), n_head=heads, dim=dim,
                       hidden_dim=size(cfg, "intermediate_size", where), n_kv_head=kv, rope_theta=theta,
                       norm_eps=positive(cfg, "rms_norm_eps", where, 1e-6),
                       tie_embeddings=bool(cfg.get("tie_word_embeddings") or False))


def arch_of(cfg: dict, where: str = "config.json") -> str:
    kind = cfg.get("model_type")
    if kind == "gpt2":
        return "gpt2"
    if kind in ("llama", "mistral"):
        return "llama"
    raise PretrainedError(f"{where}: model_type={str(kind)[:40]!r} is not supported (gpt2, llama, mistral)")


def model_config(d: Path) -> tuple[str, GPT2Config | LlamaConfig]:
    """(arch, config) of the checkpoint in ``d``, refusing what cannot be represented (naming the field)."""
    cfg, where = read_config(d), str(d / "config.json")
    arch = arch_of(cfg, where)
    return arch, (gpt2_config(cfg, where) if arch == "gpt2" else llama_config(cfg, where))


def checked_config(arch: str, fields: Any, where: str) -> GPT2Config | LlamaConfig:
    """A run's stored ``model_config`` (its checkpoint's ``meta.json``) as a config, each field typed and bounded
    as ``config.json``'s are; the model's own constructor checks the rest (heads dividing the width)."""
    cls = GPT2Config if arch == "gpt2" else LlamaConfig
    known = {f.name: f for f in dataclasses.fields(cls)}
    if not isinstance(fields, dict) or set(fields) - set(known):
        raise PretrainedError(f"{where}: model_config must be an object with fields of {sorted(known)}")
    for k, v in fields.items():
        kind = str(known[k].type)
        if k in BOUNDS:
            size(fields, k, f"{where} (model_config)", None if k == "n_kv_head" else _REQUIRED)
        elif kind == "bool":
            refuse(fields, k, lambda x: isinstance(x, bool), "true or false", where)
        elif type(v) not in (int, float) or not math.isfinite(v) or v < 0 or (k == "dropout" and v >= 1):
            raise PretrainedError(f"{where}: model_config.{k}={repr(v)[:40]} must be a finite number >= 0")
    return cls(**fields)


def to_hf_config(c: GPT2Config | LlamaConfig) -> dict:
    """``config.json`` for ``transformers``' ``GPT2LMHeadModel`` / ``LlamaForCausalLM``."""
    if isinstance(c, GPT2Config):
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
                "n_positions": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head,
                "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": c.ln_eps,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "tie_word_embeddings": True,
                "bos_token_id": None, "eos_token_id": None, "torch_dtype": "float32"}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c.vocab_size,
            "hidden_size": c.dim, "intermediate_size": c.hidden_dim, "num_hidden_layers": c.n_layer,
            "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head or c.n_head,
            "head_dim": c.dim // c.n_head, "max_position_embeddings": c.block_size, "rms_norm_eps": c.norm_eps,
            "rope_theta": c.rope_theta, "rope_scaling": None, "hidden_act": "silu", "attention_bias": False,
            "mlp_bias": False, "tie_word_embeddings": c.tie_embeddings, "bos_token_id": None,
            "eos_token_id": None, "torch_dtype": "float32"}


__all__ = ["BOUNDS", "PretrainedError", "arch_of", "checked_config", "gpt2_config", "llama_config", "model_config",
           "positive", "read_config", "refuse", "size", "to_hf_config"]
