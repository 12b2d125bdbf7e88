"""Client rank budgets of a federated run: their checks and each client's budget.

A budget is one of ``{"ratio": p}`` (FedLMT's convention: rank ``ceil(p·min(m, n))`` for an m×n layer, so a
full-rank factorization U·V holds (m + n)·min(m, n) > m·n parameters), ``{"params": p}`` (``fed.budget_unit=params``:
rank ``floor(p·m·n / (m + n))``, so no layer holds more than p times its dense parameters) or ``{"rank": k}``.
Budgets are given to clients in turn (client i gets entry i mod the list's length)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from fedlowrank.schema import ConfigError

from .devices import budget_ratio

if TYPE_CHECKING:
    from .federated import FedConfig

BUDGET_UNITS = ("rank", "params")


def check_budgets(f: FedConfig) -> None:
    """Budget values and their unit."""
    if f.budget_unit not in BUDGET_UNITS:
        raise ConfigError(f"fed.budget_unit must be one of {BUDGET_UNITS}, got {f.budget_unit!r}")
    if f.ranks is not None:
        if not f.ranks or any(int(r) != r or r <= 0 for r in f.ranks):
            raise ConfigError(f"fed.ranks must be positive integers, got {f.ranks}")
        if f.budget_unit == "params":
            raise ConfigError("fed.budget_unit=params reads fed.rank_ratios as parameter ratios; fed.ranks are "
                              "absolute ranks: give one of the two")
    else:
        if not f.rank_ratios:
            raise ConfigError("fed.rank_ratios must not be empty")
        bad = [r for r in f.rank_ratios if not 0.0 < float(r) <= 1.0]
        if bad:
            raise ConfigError(f"fed.rank_ratios must lie in (0, 1], got {bad}")


def check_budget_count(f: FedConfig) -> None:
    """Every listed budget has a client (strategies that use budgets; devices-derived budgets are not listed)."""
    listed = list(f.ranks if f.ranks is not None else f.rank_ratios)
    if f.devices.budget_from == "none" and len(listed) > f.num_clients:
        key = "fed.ranks" if f.ranks is not None else "fed.rank_ratios"
        as_list = lambda xs: "[" + ",".join(str(x) for x in xs) + "]"  # noqa: E731 - the override's own form
        raise ConfigError(f"{key}={as_list(listed)} lists {len(listed)} budgets for fed.num_clients={f.num_clients}: "
                          f"{as_list(listed[f.num_clients:])} would have no client (client i takes entry i mod "
                          f"{len(listed)}); give fed.num_clients={len(listed)} or {key}={as_list(listed[:f.num_clients])}")


def client_budget(f: FedConfig, partition_id: int) -> dict[str, float | int]:
    """Rank budget of a client: cycling through the list, or derived from the client's device
    (``fed.devices.budget_from``) as the largest listed ratio that fits it."""
    key = "params" if f.budget_unit == "params" else "ratio"
    if f.devices.budget_from != "none":
        pop = f.device_population()
        if pop is not None:
            return {key: budget_ratio(pop[partition_id], f.devices, list(f.rank_ratios))}
    if f.ranks is not None:
        return {"rank": int(f.ranks[partition_id % len(f.ranks)])}
    return {key: float(f.rank_ratios[partition_id % len(f.rank_ratios)])}


__all__ = ["BUDGET_UNITS", "check_budget_count", "check_budgets", "client_budget"]
