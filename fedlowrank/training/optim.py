"""Optimizer helpers: parameter groups, state remapping after rank changes, and a client's round of SGD."""
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


class SGD:
    """``torch.optim.SGD``'s update (L2 weight decay, momentum without dampening or Nesterov) for a federated
    client's round, element for element the same arithmetic as torch's per-tensor path:
    ``g = grad + wd·p``; ``b = g`` at a parameter's first step, then ``b = μ·b + g``; ``p = p − lr·b``.

    Why not torch's: every ``torch.optim`` optimizer imports ``torch._dynamo`` when it is built and stepped
    (1.2–1.6 s of CPU once per process), which every client process and every ``main.py`` paid in its first
    round. A client's optimizer lives for one round, so there is no state dict to save or load.
    """

    def __init__(self, params: list[nn.Parameter], lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0) -> None:
        self.params = list(params)
        self.param_groups = [{"params": self.params, "lr": lr, "momentum": momentum, "weight_decay": weight_decay}]
        self._buf: list[torch.Tensor | None] = [None] * len(self.params)  # momentum buffers, as params

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient (others, and their buffers, stay as they are)."""
        g0 = self.param_groups[0]
        lr, mu, wd = g0["lr"], g0["momentum"], g0["weight_decay"]
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            g = p.grad.add(p, alpha=wd) if wd != 0 else p.grad
            if mu != 0:
                b = self._buf[i]
                if b is None:
                    b = self._buf[i] = torch.clone(g).detach()
                else:
                    b.mul_(mu).add_(g)
                g = b
            p.add_(g, alpha=-lr)
