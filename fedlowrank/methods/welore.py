"""WeLore (Jaiswal et al. 2024, "From GaLore to WeLore"): non-uniform per-matrix ranks from
the singular values of a trained model's weights.

Each target matrix's spectrum is normalised by its largest singular value; one global
threshold τ gives every matrix its rank k_i = #{σ_ij/σ_i1 ≥ τ}. τ is *solved for* (binary
search over the observed values, then a greedy per-rank refinement) so that the overall
reduction hits the requested target — no per-model threshold tables. Matrices whose own
reduction reaches ``min_ratio`` become low-rank components (LRC: trainable factors
U√S, √SVᵀ); the rest (N-LRC) stay dense and frozen. Only LRCs are fine-tuned.
"""
from __future__ import annotations

import heapq
import logging
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from fedlowrank.lowrank.factorize import _matches, _set_submodule
from fedlowrank.lowrank.layers import LowRankLinear

log = logging.getLogger(__name__)


@dataclass
class WeLoreConfig:
    name: str = "welore"
    target_reduction: float = 0.5  # overall reduction over the target matrices
    kind: str = "params"  # params | rank
    min_ratio: float = 0.4  # a matrix becomes an LRC when its own reduction is at least this
    targets: list[str] = field(default_factory=lambda: [r"attn\.", r"mlp\."])
    skip: list[str] = field(default_factory=lambda: ["lm_head"])
    pretrain_steps: int = 200  # dense training before compression (0 with from_ckpt)
    from_ckpt: str | None = None  # dense checkpoint dir (model.safetensors) to compress
    train_extra: list[str] = field(default_factory=list)  # regexes of non-LRC params that still train

    def validate(self) -> None:
        if not 0.0 <= self.target_reduction < 1.0:
            raise ValueError(f"method.target_reduction must be in [0, 1), got {self.target_reduction}")
        if self.kind not in ("params", "rank"):
            raise ValueError(f"method.kind must be params|rank, got {self.kind!r}")
        if not 0.0 <= self.min_ratio < 1.0:
            raise ValueError(f"method.min_ratio must be in [0, 1), got {self.min_ratio}")
        if self.pretrain_steps < 0:
            raise ValueError("method.pretrain_steps must be >= 0")


@dataclass
class WeLorePlan:
    ranks: dict[str, int]  # LRC name -> rank
    dense: list[str]  # N-LRC names
    threshold: float
    reduction: float  # achieved, by ``kind``
    kind: str

    def to_dict(self) -> dict:
        return {"ranks": self.ranks, "dense": self.dense, "threshold": self.threshold,
                "reduction": self.reduction, "kind": self.kind}


def target_linears(model: nn.Module, targets, skip) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules()
            if type(m) is nn.Linear and n and (not targets or _matches(n, targets)) and not _matches(n, skip)}


@torch.no_grad()
def normalized_spectra(model: nn.Module, targets, skip) -> dict[str, tuple[np.ndarray, int, int]]:
    """name -> (σ/σ_max descending, m, n) for every target linear (dense SVD of trained weights)."""
    out = {}
    for name, lin in target_linears(model, targets, skip).items():
        W = lin.weight.detach().float()
        S = torch.linalg.svdvals(W).cpu().double().numpy()
        out[name] = (S / max(S[0], 1e-30), W.shape[0], W.shape[1])
    return out


def _cost(kind: str, m: int, n: int) -> tuple[int, int]:
    """(dense size, size per rank) in the chosen measure."""
    return (m * n, m + n) if kind == "params" else (min(m, n), 1)


def plan_welore(spectra: dict[str, tuple[np.ndarray, int, int]], target: float, kind: str = "params",
                min_ratio: float = 0.4) -> WeLorePlan:
    """Solve the global threshold (and refine per-rank) so the overall reduction ≈ ``target``."""
    names = sorted(spectra)
    dense = {n: _cost(kind, spectra[n][1], spectra[n][2])[0] for n in names}
    per = {n: _cost(kind, spectra[n][1], spectra[n][2])[1] for n in names}
    before = float(sum(dense.values()))

    def ranks_at(tau: float) -> dict[str, int]:
        return {n: max(1, int((spectra[n][0] >= tau).sum())) for n in names}

    def is_lrc(n: str, k: int) -> bool:
        return 1.0 - k * per[n] / dense[n] >= min_ratio

    def size(ranks: dict[str, int]) -> float:
        return float(sum(ranks[n] * per[n] if is_lrc(n, ranks[n]) else dense[n] for n in names))

    goal = (1.0 - target) * before
    cands = np.unique(np.concatenate([spectra[n][0] for n in names] + [np.array([0.0])]))
    lo, hi = 0, len(cands) - 1  # size(ranks_at(τ)) is non-increasing in τ
    while lo < hi:
        mid = (lo + hi) // 2
        if size(ranks_at(cands[mid])) <= goal:
            hi = mid
        else:
            lo = mid + 1
    tau = float(cands[lo])
    ranks = ranks_at(tau)
    ranks = _refine(ranks, spectra, per, is_lrc, size(ranks), goal)
    lrc = {n: k for n, k in ranks.items() if is_lrc(n, k)}
    achieved = 1.0 - size(ranks) / before
    return WeLorePlan(lrc, [n for n in names if n not in lrc], tau, achieved, kind)


def _refine(ranks, spectra, per, is_lrc, cur: float, goal: float) -> dict[str, int]:
    """Greedy per-rank correction inside LRCs: give back the largest dropped singular values
    while staying under ``goal``, or drop the smallest kept ones until reaching it."""
    ranks = dict(ranks)
    if cur < goal:  # overshoot (a matrix switched to LRC): add ranks back
        heap = [(-spectra[n][0][k], n) for n, k in ranks.items() if is_lrc(n, k) and k < len(spectra[n][0])]
        heapq.heapify(heap)
        while heap:
            _, n = heapq.heappop(heap)
            k = ranks[n]
            if not is_lrc(n, k + 1) or cur + per[n] > goal:
                continue
            ranks[n], cur = k + 1, cur + per[n]
            if k + 1 < len(spectra[n][0]):
                heapq.heappush(heap, (-spectra[n][0][k + 1], n))
    elif cur > goal:  # not enough: drop the smallest kept values of LRCs
        heap = [(spectra[n][0][k - 1], n) for n, k in ranks.items() if is_lrc(n, k) and k > 1]
        heapq.heapify(heap)
        while heap and cur > goal:
            _, n = heapq.heappop(heap)
            k = ranks[n]
            ranks[n], cur = k - 1, cur - per[n]
            if k - 1 > 1:
                heapq.heappush(heap, (spectra[n][0][k - 2], n))
    return ranks


@torch.no_grad()
def apply_welore(model: nn.Module, plan: WeLorePlan, from_weights: bool = True) -> list[str]:
    """Replace LRC linears by LowRankLinear with factors U√S, √SVᵀ (best rank-k); N-LRC untouched.
    ``from_weights=False`` builds same-shaped skeletons only (to load a checkpoint into)."""
    for name, k in plan.ranks.items():
        lin = model.get_submodule(name)
        if not isinstance(lin, nn.Linear):
            raise TypeError(f"{name} is {type(lin).__name__}, expected nn.Linear")
        if from_weights:
            new = LowRankLinear.from_dense(lin, rank=k)
        else:
            new = LowRankLinear(lin.in_features, lin.out_features, k, bias=lin.bias is not None,
                                device=lin.weight.device, dtype=lin.weight.dtype, init="random")
        _set_submodule(model, name, new)
    return sorted(plan.ranks)


def freeze_non_lrc(model: nn.Module, plan: WeLorePlan, train_extra: list[str] | None = None) -> int:
    """Only LRC factors (and ``train_extra`` matches) train. Returns the number of trainable tensors."""
    n_train = 0
    for n, p in model.named_parameters():
        mod = n.rsplit(".", 1)[0]
        train = (mod in plan.ranks and n.endswith((".U", ".V"))) or any(re.search(x, n) for x in train_extra or [])
        p.requires_grad_(train)
        n_train += int(train)
    return n_train


def welore_compress(model: nn.Module, cfg: WeLoreConfig) -> WeLorePlan:
    """Plan + apply + freeze in one call, on any torch model with nn.Linear layers."""
    cfg.validate()
    plan = plan_welore(normalized_spectra(model, cfg.targets, cfg.skip), cfg.target_reduction, cfg.kind,
                       cfg.min_ratio)
    apply_welore(model, plan)
    freeze_non_lrc(model, plan, cfg.train_extra)
    log.info("WeLore: %d LRC / %d N-LRC matrices, %s reduction %.4f (target %.4f), τ=%.4g",
             len(plan.ranks), len(plan.dense), plan.kind, plan.reduction, cfg.target_reduction, plan.threshold)
    return plan
