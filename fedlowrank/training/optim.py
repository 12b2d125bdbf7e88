"""Optimizer helpers: parameter groups and state remapping after rank changes."""
from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, exclude: set[int] | None = None) -> list[dict]:
    """AdamW groups: matrices (ndim ≥ 2, incl. U/V factors) decay; biases, norms, gains don't.
    Parameters are ordered by name so checkpoints map state deterministically; those whose
    ``id`` is in ``exclude`` are left out (a caller puts them in groups of its own)."""
    named = sorted(((n, p) for n, p in model.named_parameters() if p.requires_grad), key=lambda t: t[0])
    seen: set[int] = set(exclude or ())
    decay, no_decay = [], []
    for _, p in named:
        if id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def remap_optimizer_state(optimizer: torch.optim.Optimizer, mapping: dict[nn.Parameter, nn.Parameter],
                          reset: set[nn.Parameter] | None = None) -> None:
    """Point ``optimizer`` at new parameters after a rank change, carrying their state.

    Per-element state tensors (e.g. Adam moments) keep the overlapping region (the old rank
    slots, which :meth:`LowRankMixin.grow` keeps in place) and are zero elsewhere; parameters
    in ``reset`` (e.g. after an SVD truncation rotates the basis) start from zero state.
    Scalar state such as Adam's ``step`` is kept.
    """
    reset = reset or set()
    for group in optimizer.param_groups:
        group["params"] = [mapping.get(p, p) for p in group["params"]]
    for old, new in mapping.items():
        st = optimizer.state.pop(old, None)
        if not st:
            continue
        new_st = {}
        for k, v in st.items():
            if torch.is_tensor(v) and v.shape == old.shape and v.ndim > 0:
                nv = torch.zeros(new.shape, dtype=v.dtype, device=v.device)
                if old not in reset:
                    region = tuple(slice(0, min(a, b)) for a, b in zip(old.shape, new.shape))
                    nv[region] = v[region]
                new_st[k] = nv
            else:
                new_st[k] = v
        optimizer.state[new] = new_st
