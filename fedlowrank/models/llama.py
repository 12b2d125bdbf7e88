"""LLaMA (Touvron et al. 2023): RMSNorm, rotary embeddings (RoPE), SwiGLU MLP, no biases; grouped-query
attention (Ainslie et al. 2023) when ``n_kv_head < n_head`` (LLaMA-3, Mistral, Qwen).

RoPE here rotates interleaved pairs ``(x[2i], x[2i+1])``, as Meta's original code; Hugging Face checkpoints
rotate halves, so :mod:`fedlowrank.models.hf` permutes their q/k rows on load and back on export."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedlowrank.lowrank.shared_input import shared_input_linear

from .kv_cache import extend_cache

LLAMA_SIZES = {  # n_layer, n_head, dim, ffn hidden
    "tiny": (2, 2, 64, 172),
    "mini": (4, 4, 128, 344),
    "60m": (8, 8, 512, 1376),
    "130m": (12, 12, 768, 2048),
    "350m": (24, 16, 1024, 2736),
}


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # key/value heads (GQA); null: n_head (multi-head attention)
    dim: int = 768
    hidden_dim: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    fuse_shared_input: bool = True  # q/k/v and gate/up: one GEMM for the factors (or weights) sharing x

    @classmethod
    def from_size(cls, size: str, **kw) -> "LlamaConfig":
        if size not in LLAMA_SIZES:
            raise ValueError(f"unknown LLaMA size {size!r}; choose from {sorted(LLAMA_SIZES)}")
        L, H, D, F_ = LLAMA_SIZES[size]
        return cls(n_layer=L, n_head=H, dim=D, hidden_dim=F_, **kw)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_cache(T: int, head_dim: int, theta: float, device=None) -> tuple[Tensor, Tensor]:
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)  # (hd/2,)
    ang = torch.outer(torch.arange(T, device=device).float(), inv)  # (T, hd/2)
    return ang.cos(), ang.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, H, T, hd); rotate pairs (x[2i], x[2i+1])."""
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    return out.type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        kv = cfg.n_kv_head or cfg.n_head
        if cfg.dim % cfg.n_head or cfg.n_head % kv:
            raise ValueError(f"dim ({cfg.dim}) must be divisible by n_head ({cfg.n_head}), and n_head by n_kv_head ({kv})")
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, kv, cfg.dim // cfg.n_head
        self.fuse = cfg.fuse_shared_input
        self.q_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: dict | None = None) -> Tensor:  # (B, T, D)
        B, T, D = x.shape
        proj = (self.q_proj, self.k_proj, self.v_proj)
        qkv = shared_input_linear(x, proj) if self.fuse else [p(x) for p in proj]
        heads = (self.n_head, self.n_kv_head, self.n_kv_head)
        q, k, v = (t.view(B, T, h, self.head_dim).transpose(1, 2) for t, h in zip(qkv, heads))  # (B, H|Hkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v, causal = extend_cache(cache, k, v)
        gqa = self.n_kv_head != self.n_head  # each kv head serves n_head / n_kv_head consecutive query heads
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, D))


class SwiGLU(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)
        self.fuse = cfg.fuse_shared_input

    def forward(self, x: Tensor) -> Tensor:  # (B, T, D)
        proj = (self.gate_proj, self.up_proj)
        gate, up = shared_input_linear(x, proj) if self.fuse else [p(x) for p in proj]  # (B, T, hidden) each
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: dict | None = None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    """idx (B, T) -> logits (B, T, vocab)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, idx: Tensor, cache: list[dict] | None = None) -> Tensor:
        """``cache`` (generation): one dict per layer, filled by the prompt, then extended one token at a time."""
        B, T = idx.shape
        pos = cache[0]["k"].shape[2] if cache and "k" in cache[0] else 0  # tokens already in the cache
        if pos + T > self.config.block_size:
            raise ValueError(f"sequence length {pos + T} > block_size {self.config.block_size}")
        cos, sin = rope_cache(pos + T, self.config.dim // self.config.n_head, self.config.rope_theta, idx.device)
        cos, sin = cos[pos:], sin[pos:]
        x = self.embed(idx)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache[i] if cache is not None else None)
        return self.lm_head(self.norm(x))
