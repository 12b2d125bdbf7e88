"""LSTM language/sequence model with factorizable input/recurrent projections.

``nn.LSTM`` keeps its weights inside a fused kernel, so this cell writes the gates with
plain ``nn.Linear`` layers (W_ih, W_hh) that :func:`factorize` can replace. The input path is one GEMM over
all time steps. A factorized recurrent path is applied per step either as two thin GEMMs (``factored``:
h Vᵀ Uᵀ) or as one GEMM with ``W_hh = U V`` formed once per forward (``merged``; gradients flow to U and V
through the product); ``recurrent`` picks it (``benchmarks/bench_lstm.py`` measures both).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedlowrank.lowrank import LowRankLinear

RECURRENT_MODES = ("factored", "merged")


@dataclass
class LSTMConfig:
    vocab_size: int = 256
    emb_dim: int = 64
    hidden: int = 128
    layers: int = 1
    dropout: float = 0.0


class LSTMCellLinear(nn.Module):
    def __init__(self, d_in: int, hidden: int, recurrent: str = "factored") -> None:
        super().__init__()
        self.W_ih = nn.Linear(d_in, 4 * hidden)
        self.W_hh = nn.Linear(hidden, 4 * hidden, bias=False)
        self.hidden = hidden
        self.recurrent = recurrent

    def _recurrent(self):
        """h (B, H) -> (B, 4H): ``W_hh`` as it is, or its factors merged into one (4H, H) matrix."""
        if isinstance(self.W_hh, LowRankLinear) and self.recurrent == "merged":
            U, V = self.W_hh._factors()
            W = U @ V  # (4H, r) @ (r, H)
            bias = self.W_hh.bias
            return lambda h: F.linear(h, W, bias)
        return self.W_hh

    def forward(self, x: Tensor) -> Tensor:  # (B, T, d_in) -> (B, T, hidden)
        B, T, _ = x.shape
        h = x.new_zeros(B, self.hidden)
        c = x.new_zeros(B, self.hidden)
        xi = self.W_ih(x)  # (B, T, 4H): input projection for all steps at once
        rec = self._recurrent()
        outs = []
        for t in range(T):
            i, f, g, o = (xi[:, t] + rec(h)).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outs.append(h)
        return torch.stack(outs, 1)


class LSTMLM(nn.Module):
    """Token ids (B, T) -> logits (B, T, vocab)."""

    def __init__(self, cfg: LSTMConfig) -> None:
        super().__init__()
        self.emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        dims = [cfg.emb_dim] + [cfg.hidden] * cfg.layers
        self.cells = nn.ModuleList([LSTMCellLinear(dims[i], dims[i + 1]) for i in range(cfg.layers)])
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.hidden, cfg.vocab_size)

    def forward(self, idx: Tensor) -> Tensor:
        h = self.emb(idx)
        for cell in self.cells:
            h = self.drop(cell(h))
        return self.head(h)
