"""Triton kernels for factorized layers, each beside a torch reference; CPU falls back."""
from __future__ import annotations

from torch import nn

from .lowrank_linear import HAVE_TRITON, kernel_available, lowrank_linear, lowrank_linear_ref


def enable_kernels(model: nn.Module, enabled: bool = True) -> int:
    """Route every ``LowRankLinear`` (the layers with a ``use_kernel`` switch; the kernels sit below the layers and
    never import them) through the fused kernel (where available). Returns the count."""
    n = 0
    for m in model.modules():
        if hasattr(m, "use_kernel"):
            m.use_kernel = enabled
            n += 1
    return n


__all__ = ["HAVE_TRITON", "enable_kernels", "kernel_available", "lowrank_linear", "lowrank_linear_ref"]
