"""WeLore (Jaiswal et al. 2024, "From GaLore to WeLore"): non-uniform per-matrix ranks from
the singular values of a trained model's weights.

Reference convention (VITA-Group/WeLore, the default here): each target matrix's spectrum is
min-max normalised, ``(σ - σ_min) / (σ_max - σ_min)``; one global threshold τ prunes the
values below it, so matrix i keeps ``k_i = #{σ̂_ij ≥ τ}``; a matrix whose rank-reduction ratio
``(rank - k_i) / rank`` exceeds ``min_ratio`` becomes a low-rank component (LRC: trainable
factors U√S, √SVᵀ), the others (N-LRC) stay dense and frozen. During fine-tuning the LRCs and
the norms train (embeddings, head and N-LRCs stay frozen). ``normalize=max`` (σ/σ_max) and
``lrc_rule=params`` (parameter reduction ≥ ``min_ratio``) keep the project's earlier convention.

The reference looks τ up in per-model tables; here τ is *solved for*: the lowest observed value whose plan
reaches the requested reduction (binary search). By default the plan is that one global τ, as the reference;
``refine=True`` then corrects ranks greedily, matrix by matrix, to land on the target, and those per-matrix ranks
are the plan (no single τ reproduces them). ``kind=rank`` measures the reduction as the reference's tables do
(attempted rank reduction, over all target matrices); the achieved *parameter* reduction is always reported
beside it (``params_reduction``). A target that cannot be met is reported with the achieved value.
"""
from __future__ import annotations

import heapq
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from fedlowrank.lowrank.factorize import matches_any, set_submodule
from fedlowrank.lowrank.layers import LowRankLinear

log = logging.getLogger(__name__)
Spectra = dict[str, tuple[np.ndarray, int, int]]  # name -> (normalised σ, descending; m; n)


@dataclass
class WeLoreConfig:
    name: str = "welore"
    target_reduction: float = 0.5  # overall reduction over the target matrices
    kind: str = "params"  # params | rank: what target_reduction measures
    min_ratio: float = 0.4999  # LRC when the matrix's own reduction exceeds this (reference default)
    normalize: str = "minmax"  # minmax (reference) | max (σ/σ_max)
    lrc_rule: str = "rank"  # rank: (rank-k)/rank > min_ratio (reference) | params: param reduction >= min_ratio
    train_norms: bool = True  # norms train with the LRCs (reference)
    tolerance: float = 0.01  # warn when the achieved reduction misses the target by more
    targets: list[str] = field(default_factory=lambda: [r"attn\.", r"mlp\."])
    skip: list[str] = field(default_factory=lambda: ["lm_head"])
    pretrain_steps: int = 200  # dense training before compression (0 with from_ckpt)
    from_ckpt: str | None = None  # dense checkpoint dir (model.safetensors) to compress
    train_extra: list[str] = field(default_factory=list)  # regexes of non-LRC params that still train
    refine: bool = False  # per-matrix rank correction after the global τ (off: one global τ, as the reference)

    def validate(self) -> None:
        if not 0.0 <= self.target_reduction < 1.0:
            raise ValueError(f"method.target_reduction must be in [0, 1), got {self.target_reduction}")
        if self.kind not in ("params", "rank"):
            raise ValueError(f"method.kind must be params|rank, got {self.kind!r}")
        if not 0.0 <= self.min_ratio < 1.0:
            raise ValueError(f"method.min_ratio must be in [0, 1), got {self.min_ratio}")
        if self.normalize not in ("minmax", "max"):
            raise ValueError(f"method.normalize must be minmax|max, got {self.normalize!r}")
        if self.lrc_rule not in ("rank", "params"):
            raise ValueError(f"method.lrc_rule must be rank|params, got {self.lrc_rule!r}")
        if self.tolerance <= 0:
            raise ValueError(f"method.tolerance must be > 0, got {self.tolerance}")
        if self.pretrain_steps < 0:
            raise ValueError("method.pretrain_steps must be >= 0")


@dataclass
class WeLorePlan:
    ranks: dict[str, int]  # LRC name -> rank
    dense: list[str]  # N-LRC names
    threshold: float
    reduction: float  # achieved, by ``kind``
    kind: str
    params_reduction: float | None = None  # achieved parameter reduction over the target matrices
    refined: bool = False  # ranks corrected per matrix after τ (then τ alone does not reproduce them)

    def to_dict(self) -> dict:
        return {"ranks": self.ranks, "dense": self.dense, "threshold": self.threshold,
                "reduction": self.reduction, "kind": self.kind, "params_reduction": self.params_reduction,
                "refined": self.refined}


def target_linears(model: nn.Module, targets, skip) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules()
            if type(m) is nn.Linear and n and (not targets or matches_any(n, targets)) and not matches_any(n, skip)}


def normalize_spectrum(S: np.ndarray, how: str = "minmax") -> np.ndarray:
    """σ (descending) → ``(σ-σ_min)/(σ_max-σ_min)`` (minmax) or ``σ/σ_max`` (max). A flat
    spectrum normalises to ones (nothing below any threshold ≤ 1)."""
    S = np.asarray(S, dtype=np.float64)
    if how == "max":
        return S / max(S[0], 1e-30)
    span = S.max() - S.min()
    return np.ones_like(S) if span <= 0 else (S - S.min()) / span


@torch.no_grad()
def normalized_spectra(model: nn.Module, targets, skip, normalize: str = "minmax") -> Spectra:
    """name -> (normalised σ descending, m, n) for every target linear (dense SVD of trained weights)."""
    out = {}
    for name, lin in target_linears(model, targets, skip).items():
        W = lin.weight.detach().float()
        S = torch.linalg.svdvals(W).cpu().double().numpy()
        out[name] = (normalize_spectrum(S, normalize), W.shape[0], W.shape[1])
    return out


def _cost(kind: str, m: int, n: int) -> tuple[int, int]:
    """(dense size, size per rank) in the chosen measure."""
    return (m * n, m + n) if kind == "params" else (min(m, n), 1)


def lrc_rule(rule: str, min_ratio: float, spectra: Spectra) -> Callable[[str, int], bool]:
    """``is_lrc(name, k)``: whether rank k makes matrix ``name`` a low-rank component."""
    def is_lrc(n: str, k: int) -> bool:
        m, d = spectra[n][1], spectra[n][2]
        if rule == "rank":
            return (min(m, d) - k) / min(m, d) > min_ratio
        return 1.0 - k * (m + d) / (m * d) >= min_ratio
    return is_lrc


def ranks_at(spectra: Spectra, tau: float) -> dict[str, int]:
    """Ranks kept at threshold τ: the normalised values ≥ τ (at least 1)."""
    return {n: max(1, int((spectra[n][0] >= tau).sum())) for n in spectra}


def plan_at_threshold(spectra: Spectra, tau: float, kind: str = "params", min_ratio: float = 0.4999,
                      rule: str = "rank") -> WeLorePlan:
    """The plan a fixed threshold τ gives (the reference's procedure, no target)."""
    is_lrc = lrc_rule(rule, min_ratio, spectra)
    ranks = ranks_at(spectra, tau)
    lrc = {n: k for n, k in sorted(ranks.items()) if is_lrc(n, k)}
    return WeLorePlan(lrc, sorted(n for n in spectra if n not in lrc), tau,
                      _reduction(spectra, ranks, kind, is_lrc), kind, _reduction(spectra, ranks, "params", is_lrc))


def _reduction(spectra: Spectra, ranks: dict[str, int], kind: str, is_lrc) -> float:
    dense = {n: _cost(kind, s[1], s[2]) for n, s in spectra.items()}
    before = float(sum(d for d, _ in dense.values()))
    after = sum(ranks[n] * per if is_lrc(n, ranks[n]) else d for n, (d, per) in dense.items())
    return 1.0 - after / before


def plan_welore(spectra: Spectra, target: float, kind: str = "params", min_ratio: float = 0.4999,
                rule: str = "rank", tolerance: float = 0.01, refine: bool = False) -> WeLorePlan:
    """Solve the global threshold τ so the overall reduction reaches ``target``; with ``refine``, correct the
    ranks per matrix to land on it."""
    names = sorted(spectra)
    dense = {n: _cost(kind, spectra[n][1], spectra[n][2])[0] for n in names}
    per = {n: _cost(kind, spectra[n][1], spectra[n][2])[1] for n in names}
    before = float(sum(dense.values()))
    is_lrc = lrc_rule(rule, min_ratio, spectra)

    def size(ranks: dict[str, int]) -> float:
        return float(sum(ranks[n] * per[n] if is_lrc(n, ranks[n]) else dense[n] for n in names))

    goal = (1.0 - target) * before
    cands = np.unique(np.concatenate([spectra[n][0] for n in names] + [np.array([0.0])]))
    lo, hi = 0, len(cands) - 1  # size(ranks_at(τ)) is non-increasing in τ
    while lo < hi:
        mid = (lo + hi) // 2
        if size(ranks_at(spectra, cands[mid])) <= goal:
            hi = mid
        else:
            lo = mid + 1
    tau = float(cands[lo])
    ranks = ranks_at(spectra, tau)
    if refine:
        ranks = _refine(ranks, spectra, per, is_lrc, size(ranks), goal)
    lrc = {n: k for n, k in ranks.items() if is_lrc(n, k)}
    achieved = 1.0 - size(ranks) / before
    if abs(achieved - target) > tolerance:
        log.warning("WeLore: requested %s reduction %.4f but achieved %.4f (%d matrices; min_ratio %.4g and "
                    "the LRC rule %r limit which reductions exist)", kind, target, achieved, len(names),
                    min_ratio, rule)
    return WeLorePlan(lrc, [n for n in names if n not in lrc], tau, achieved, kind,
                      _reduction(spectra, ranks, "params", is_lrc), refine)


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
        set_submodule(model, name, new)
    return sorted(plan.ranks)


def is_norm_param(model: nn.Module, name: str) -> bool:
    """Whether parameter ``name`` belongs to a normalisation layer (LayerNorm, RMSNorm, ...)."""
    mod = name.rsplit(".", 1)[0] if "." in name else ""
    return "norm" in type(model.get_submodule(mod)).__name__.lower()


def freeze_non_lrc(model: nn.Module, plan: WeLorePlan, train_extra: list[str] | None = None,
                   train_norms: bool = True) -> int:
    """LRC factors, norms (``train_norms``) and ``train_extra`` matches train; embeddings, head
    and N-LRC matrices are frozen. Returns the number of trainable tensors."""
    n_train = 0
    for n, p in model.named_parameters():
        mod = n.rsplit(".", 1)[0]
        train = ((mod in plan.ranks and n.endswith((".U", ".V"))) or (train_norms and is_norm_param(model, n))
                 or any(re.search(x, n) for x in train_extra or []))
        p.requires_grad_(train)
        n_train += int(train)
    return n_train


def welore_compress(model: nn.Module, cfg: WeLoreConfig) -> WeLorePlan:
    """Plan + apply + freeze in one call, on any torch model with nn.Linear layers."""
    cfg.validate()
    plan = plan_welore(normalized_spectra(model, cfg.targets, cfg.skip, cfg.normalize), cfg.target_reduction,
                       cfg.kind, cfg.min_ratio, cfg.lrc_rule, cfg.tolerance, cfg.refine)
    apply_welore(model, plan)
    freeze_non_lrc(model, plan, cfg.train_extra, cfg.train_norms)
    log.info("WeLore: %d LRC / %d N-LRC matrices, %s reduction %.4f (target %.4f; parameter reduction %.4f), "
             "τ=%.4g%s", len(plan.ranks), len(plan.dense), plan.kind, plan.reduction, cfg.target_reduction,
             plan.params_reduction, plan.threshold, ", ranks refined per matrix" if plan.refined else "")
    return plan
