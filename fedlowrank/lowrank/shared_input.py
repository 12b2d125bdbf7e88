"""Linear layers that read the same input, computed together (q/k/v, LLaMA's gate/up).

Factorized members share their first GEMM: ``h = x [V_1; …; V_k]ᵀ`` (..., Σ r_i) is one GEMM
instead of k, then ``y_i = h_i U_iᵀ + b_i``. Dense ``nn.Linear`` members are concatenated the
same way (one GEMM over ``[W_1; …; W_k]``), so a dense baseline gets the same treatment.
Parameters stay per layer: state-dict keys, rank changes, checkpoints and aggregation are unchanged.
Other members (LoRA, kernels, custom layers) run on their own.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import LowRankLinear


def _fusable_lowrank(m: nn.Module) -> bool:
    return type(m) is LowRankLinear and not m.use_kernel


def _fusable_dense(m: nn.Module) -> bool:
    return type(m) is nn.Linear


def shared_input_linear(x: Tensor, layers: Sequence[nn.Module]) -> list[Tensor]:
    """``[layer(x) for layer in layers]`` with one GEMM per group of fusable members.

    x: (..., in); returns one (..., out_i) tensor per layer, in order.
    """
    out: list[Tensor | None] = [None] * len(layers)
    low = [i for i, m in enumerate(layers) if _fusable_lowrank(m)]
    if len(low) > 1:
        factors = [layers[i]._factors() for i in low]  # type: ignore[operator]
        h = F.linear(x, torch.cat([V for _, V in factors], 0))  # (..., Σ r_i): one GEMM
        for i, (U, V), h_i in zip(low, factors, h.split([V.shape[0] for _, V in factors], -1)):
            out[i] = F.linear(h_i, U, layers[i].bias)  # (..., out_i)
    dense = [i for i, m in enumerate(layers) if _fusable_dense(m)]
    has_bias = {layers[i].bias is not None for i in dense}
    if len(dense) > 1 and len(has_bias) == 1:
        W = torch.cat([layers[i].weight for i in dense], 0)  # (Σ out_i, in)
        b = torch.cat([layers[i].bias for i in dense], 0) if has_bias.pop() else None
        ys = F.linear(x, W, b).split([layers[i].out_features for i in dense], -1)
        for i, y in zip(dense, ys):
            out[i] = y
    return [y if y is not None else layers[i](x) for i, y in enumerate(out)]
