"""Module replacement: turn any torch model's Linear/Conv2d layers into factorized ones."""
from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .layers import LowRankConv2d, LowRankLinear, LowRankMixin

log = logging.getLogger(__name__)

# Dispatch table: dense type -> factorized constructor (dense, rank, ratio) -> module.
FACTORIZERS: dict[type[nn.Module], Callable[..., LowRankMixin]] = {
    nn.Linear: LowRankLinear.from_dense,
    nn.Conv2d: LowRankConv2d.from_dense,
}


def matches_any(name: str, patterns: Iterable[str] | None) -> bool:
    """Whether module name ``name`` matches (fully, or by search) any regex of ``patterns``."""
    return any(re.fullmatch(p, name) or re.search(p, name) for p in (patterns or []))


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) of ``model`` by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def factorize(
    model: nn.Module,
    rank: int | None = None,
    ratio: float | None = None,
    targets: Iterable[str] | None = None,
    skip: Iterable[str] | None = None,
    only_if_smaller: bool = False,
    dense_first: int = 0,
    init: str = "spectral",
) -> list[str]:
    """Replace Linear/Conv2d modules of ``model`` in place by factorized ones.

    Args:
        rank / ratio: budget for every replaced layer (exactly one).
        targets: regexes of module names to factorize (default: every supported layer).
        skip: regexes of module names kept dense (hybrid models, e.g. first conv and head).
        only_if_smaller: keep a layer dense when the factors would hold more parameters.
        dense_first: keep the first ``k`` layers that would be factorized dense, in module order (Pufferfish's
            hybrid: the early layers, few parameters and sensitive, stay full rank).
        init: ``spectral``: the best rank-r approximation (SVD) of the dense layer's weights, i.e. spectral
            initialisation when they are a fresh init (Khodak et al. 2021); ``random``: independent factors.
    Returns:
        Names of the replaced modules.
    """
    if (rank is None) == (ratio is None):
        raise ValueError("factorize needs exactly one of rank= or ratio=")
    if init not in ("spectral", "random") or dense_first < 0:
        raise ValueError(f"factorize: init must be spectral|random and dense_first >= 0, got {init!r}, {dense_first}")
    targets = list(targets) if targets else None
    replaced: list[str] = []
    kept_first = 0
    for name, module in list(model.named_modules()):
        maker = FACTORIZERS.get(type(module))
        if maker is None or not name:
            continue
        if targets is not None and not matches_any(name, targets):
            continue
        if matches_any(name, skip):
            continue
        if isinstance(module, nn.Conv2d) and (module.groups != 1 or isinstance(module.padding, str)):
            log.debug("keeping %s dense (grouped or string padding)", name)
            continue
        if kept_first < dense_first:
            kept_first += 1
            continue
        new = maker(module, rank=rank, ratio=ratio)
        if only_if_smaller and new.factor_params() >= new.dense_params():
            continue
        if init == "random":
            new.random_init_()
        set_submodule(model, name, new)
        replaced.append(name)
    if targets is not None and not replaced:
        raise ValueError(f"factorize: no module matched targets={targets}")
    return replaced


def densify(model: nn.Module) -> list[str]:
    """Merge every factorized layer back into its dense equivalent, in place."""
    names = [n for n, m in model.named_modules() if isinstance(m, LowRankMixin)]
    for name in names:
        set_submodule(model, name, model.get_submodule(name).merge())  # type: ignore[operator]
    return names


def lowrank_modules(model: nn.Module) -> dict[str, LowRankMixin]:
    """Name → factorized layer."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LowRankMixin)}


def model_ranks(model: nn.Module) -> dict[str, int]:
    return {n: m.rank for n, m in lowrank_modules(model).items()}


def set_ranks(model: nn.Module, ranks: dict[str, int]) -> None:
    """Explicitly set the rank of named factorized layers (truncate or grow)."""
    mods = lowrank_modules(model)
    for name, r in ranks.items():
        if name not in mods:
            raise KeyError(f"{name!r} is not a factorized layer")
        mods[name].set_rank(int(r))


def frobenius_decay(model: nn.Module) -> torch.Tensor:
    """Σ ‖U V‖_F² over factorized layers (Khodak et al. 2021), never forming U V."""
    terms = [m.frobenius_decay() for m in lowrank_modules(model).values()]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()
