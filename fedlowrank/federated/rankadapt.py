"""Rank-adaptive federated training (``method=inrank`` in federated mode): InRank's explained-ratio
rule applied by the server to the *aggregated* global model each round.

For every factorized layer ``p`` with global factors U (m, R), V (R, n), the server takes the
singular values of U·V from the thin factors (QR of each factor + an R×R SVD, no m×n matrix), finds
the explained-ratio rank k (InRank's ``1 - var(tail)/var(s)``, or the energy rule), and sets

    R' = min(cap_p, k + buffer)   if k + buffer > R            (grow: new slots keep U·V unchanged)
    R' = k + buffer                if k + buffer + slack < R    (shrink: optimal truncation via the SVD)

``cap_p`` is the largest client budget's rank for that layer (fedlmt: the smallest), times
``max_rank_ratio``. The settings are central InRank's (``InRankConfig``, registered as ``method=inrank``) plus ``warmup_rounds``,
``check_rounds``, ``shrink`` and ``slack``. Clients'
budgets are caps: client c trains min(R', budget_c) slots. Growth is seeded by (seed, round, layer),
so a resumed run grows identically.
"""
from __future__ import annotations

import logging

import torch

from fedlowrank.lowrank.layers import grow_factors, growth_generator, rank_from_budget
from fedlowrank.lowrank.spectrum import explained_rank, explained_variance_rank, factored_svdvals, truncate_factors
from fedlowrank.methods.inrank import InRankConfig

from .aggregation import State, factor_prefixes

log = logging.getLogger(__name__)


def due(cfg: InRankConfig, rnd: int) -> bool:
    """Whether the server checks ranks after round ``rnd`` (1-based)."""
    return rnd > cfg.warmup_rounds and (rnd - cfg.warmup_rounds) % cfg.check_rounds == 0


def layer_caps(state: State, cfg: InRankConfig, top_budget: dict) -> dict[str, int]:
    """Per layer: the largest client budget's rank, times ``max_rank_ratio`` (at least 1)."""
    out = {}
    for p in factor_prefixes(state):
        m, n = state[f"{p}.U"].shape[0], state[f"{p}.V"].shape[1]
        out[p] = max(1, int(cfg.max_rank_ratio * rank_from_budget(min(m, n), **top_budget, dims=(m, n))))
    return out


def explained(U: torch.Tensor, V: torch.Tensor, cfg: InRankConfig) -> int:
    """Explained-ratio rank of U·V from the factors (no dense matrix)."""
    S = factored_svdvals(U, V)
    if cfg.rule == "variance":
        return explained_variance_rank(S, cfg.threshold, n_total=min(U.shape[0], V.shape[1]))
    return explained_rank(S, cfg.threshold)


@torch.no_grad()
def adapt_ranks(state: State, cfg: InRankConfig, caps: dict[str, int], seed: int,
                rnd: int) -> tuple[State, dict[str, tuple[int, int, int]]]:
    """New global state with every layer at its adapted rank, and {layer: (old R, explained k, new R)}."""
    out = dict(state)
    info = {}
    for i, p in enumerate(sorted(factor_prefixes(state))):
        U, V = state[f"{p}.U"], state[f"{p}.V"]
        R = U.shape[1]
        k = explained(U, V, cfg)
        target = min(caps[p], k + cfg.buffer)
        new = R
        if target > R:  # as LowRankLinear.grow: U·V unchanged
            out[f"{p}.U"], out[f"{p}.V"] = grow_factors(U, V, target, generator=growth_generator(seed, rnd, i))
            new = target
        elif cfg.shrink and target + cfg.slack < R:
            Ut, Vt = truncate_factors(U, V, target)
            out[f"{p}.U"], out[f"{p}.V"] = Ut.to(U.dtype).contiguous(), Vt.to(V.dtype).contiguous()
            new = target
        info[p] = (R, k, new)
    changed = {p: f"{a}->{c} (k={b})" for p, (a, b, c) in info.items() if a != c}
    if changed:
        log.info("round %d: federated InRank changed %d layer rank(s): %s", rnd, len(changed), changed)
    return {k: out[k] for k in state}, info
