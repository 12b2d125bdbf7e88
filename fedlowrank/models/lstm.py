"""LSTM language/sequence model with factorizable input/recurrent projections.

``nn.LSTM`` keeps its weights inside a fused kernel, so this cell writes the gates with
plain ``nn.Linear`` layers (W_ih, W_hh) that :func:`factorize` can replace.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class LSTMConfig:
    vocab_size: int = 256
    emb_dim: int = 64
    hidden: int = 128
    layers: int = 1
    dropout: float = 0.0


class LSTMCellLinear(nn.Module):
    def __init__(self, d_in: int, hidden: int) -> None:
        super().__init__()
        self.W_ih = nn.Linear(d_in, 4 * hidden)
        self.W_hh = nn.Linear(hidden, 4 * hidden, bias=False)
        self.hidden = hidden

    def forward(self, x: Tensor) -> Tensor:  # (B, T, d_in) -> (B, T, hidden)
        B, T, _ = x.shape
        h = x.new_zeros(B, self.hidden)
        c = x.new_zeros(B, self.hidden)
        xi = self.W_ih(x)  # (B, T, 4H): input projection for all steps at once
        outs = []
        for t in range(T):
            i, f, g, o = (xi[:, t] + self.W_hh(h)).chunk(4, dim=-1)
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
