"""LoRA adapters on frozen dense linears (Hu et al. 2021), built on the factorized core:
the adapter is a :class:`LowRankLinear` with ``U = B`` (out, r) and ``V = A`` (r, in).

``y = base(x) + s · B A dropout(x)``, ``s = alpha / r`` (or ``s = tanh(c)`` with a learned scalar
``c`` when ``trainable_scaling``, as ReLoRA's ``--train_scaling``). ``merge()`` folds ``s·B·A`` into the
base weight; ``reinit()`` draws a fresh A (Kaiming-uniform) and zeroes B, so right after a
merge + reinit the layer computes the same function and both factors get gradients.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .factorize import matches_any, set_submodule
from .layers import LowRankLinear


class LoRALinear(nn.Module):
    """Frozen ``base`` (nn.Linear) plus a trainable rank-r adapter. x (..., in) -> (..., out)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float = 1.0, dropout: float = 0.0,
                 trainable_scaling: bool = False) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        self.base = base
        self.base.weight.requires_grad_(False)
        if self.base.bias is not None:
            self.base.bias.requires_grad_(False)
        r = min(r, base.in_features, base.out_features)
        self.adapter = LowRankLinear(base.in_features, base.out_features, r, bias=False,
                                     device=base.weight.device, dtype=base.weight.dtype, init="random")
        self.register_buffer("scaling", torch.tensor(float(alpha) / r, dtype=torch.float32))
        # learned scale s = tanh(c); c starts at 1 and is reset to 1 by reinit()
        self.scale_param = nn.Parameter(torch.ones((), device=base.weight.device)) if trainable_scaling else None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reinit()

    @property
    def rank(self) -> int:
        return self.adapter.rank

    def scale(self) -> Tensor:
        """The adapter's scale s (a 0-d tensor): alpha / r, or tanh(c) when learned."""
        return torch.tanh(self.scale_param) if self.scale_param is not None else self.scaling

    def adapter_parameters(self) -> list[nn.Parameter]:
        """A, B (and c): the parameters a ReLoRA restart re-initialises."""
        return list(self.adapter.parameters()) + ([self.scale_param] if self.scale_param is not None else [])

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scale().to(x.dtype) * self.adapter(self.dropout(x))

    @torch.no_grad()
    def reinit(self, generator: torch.Generator | None = None) -> None:
        """A ~ Kaiming-uniform (never zero), B = 0. Drawn on the CPU so a seeded generator
        gives the same A on every process."""
        A = self.adapter.V
        bound = 1.0 / math.sqrt(A.shape[1])  # kaiming_uniform_(a=sqrt(5)) bound, as nn.Linear
        newA = torch.empty(A.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        _assign(A, newA)
        self.adapter.U.zero_()
        if self.scale_param is not None:
            self.scale_param.fill_(1.0)

    @torch.no_grad()
    def delta(self) -> Tensor:
        """s·B·A (out, in) as a full tensor (gathers FSDP2 shards)."""
        B, A = _full(self.adapter.U), _full(self.adapter.V)
        return _full(self.scale()).to(torch.float32) * (B.float() @ A.float())

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W + s·B·A (function unchanged; call :meth:`reinit` afterwards for a new cycle)."""
        W = self.base.weight
        _add(W, self.delta().to(W.dtype))

    def merged_linear(self) -> nn.Linear:
        """A plain nn.Linear computing base + adapter (does not modify this module)."""
        lin = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                        device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(_full(self.base.weight) + self.delta().to(lin.weight.dtype))
            if self.base.bias is not None:
                lin.bias.copy_(_full(self.base.bias))
        return lin


def _full(t: Tensor) -> Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _assign(param: Tensor, value: Tensor) -> None:
    """param ← value, where param may be an FSDP2 DTensor shard and value is the full tensor."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        param.copy_(distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements))
    else:
        param.copy_(value.to(param.device, param.dtype))


def _add(param: Tensor, value: Tensor) -> None:
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        param.add_(distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements))
    else:
        param.add_(value.to(param.device, param.dtype))


def add_lora(model: nn.Module, r: int | None = None, alpha: float = 1.0, dropout: float = 0.0,
             targets: Iterable[str] | None = None, skip: Iterable[str] | None = None,
             ratio: float | None = None, trainable_scaling: bool = False) -> list[str]:
    """Wrap matching ``nn.Linear`` modules with :class:`LoRALinear` (rank ``r`` or ``ratio`` of full rank)."""
    from .layers import rank_from_budget

    targets = list(targets) if targets else None
    names = []
    for name, m in list(model.named_modules()):
        if type(m) is not nn.Linear or not name:
            continue
        if (targets is not None and not matches_any(name, targets)) or matches_any(name, skip):
            continue
        rank = rank_from_budget(min(m.in_features, m.out_features), rank=r, ratio=ratio)
        set_submodule(model, name, LoRALinear(m, rank, alpha, dropout, trainable_scaling))
        names.append(name)
    if not names:
        raise ValueError(f"add_lora: no nn.Linear matched targets={targets} skip={skip}")
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> list[str]:
    """Replace every LoRALinear by the equivalent dense nn.Linear (deployment)."""
    names = list(lora_modules(model))
    for n in names:
        set_submodule(model, n, model.get_submodule(n).merged_linear())  # type: ignore[operator]
    return names
