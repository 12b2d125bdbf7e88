"""InRank (Zhao et al. 2023, "InRank: Incremental Low-Rank Learning") as a trainer hook.

Every factorized layer starts at ``init_rank + buffer``. Every ``check_interval`` optimizer
steps after ``warmup_steps``, the explained-ratio rank k is found from the spectrum of the thin
factors; if ``k + buffer`` exceeds the current rank, the layer grows to it (new slots keep the
function unchanged). ``rule=variance`` (default) is the paper's explained ratio
``1 - var(s_tail)/var(s)`` exactly as in the reference code (jiaweizzhao/InRank: tail = s with
its k leading values zeroed, s padded with zeros to min(m, n), smallest k whose ratio exceeds
the threshold); ``rule=energy`` is ``Σ_{i<k} s_i² / Σ s_i² ≥ threshold``. Stage 1 ends after ``stage1_steps``: layers are truncated to their
explained rank and saved as a compressed checkpoint; stage 2 trains at those fixed ranks.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from fedlowrank.lowrank import (explained_energy_ratios, explained_rank, explained_variance_rank,
                                explained_variance_ratios, lowrank_modules)
from fedlowrank.lowrank.layers import growth_generator

log = logging.getLogger(__name__)


@dataclass
class InRankConfig:
    name: str = "inrank"
    rule: str = "variance"  # variance (paper: 1 - var(tail)/var(s)) | energy (sum of s^2)
    threshold: float = 0.9
    init_rank: int = 2  # reference init_modes
    buffer: int = 16  # extra slots above the explained rank: the most a layer grows per check
    warmup_steps: int = 0
    check_interval: int = 25  # reference gap_iter
    stage1_steps: int = 100
    max_rank_ratio: float = 1.0  # cap as a fraction of full rank (the reference caps at 0.5)
    # new slots: zero_u (new U columns zero, V rows random: the function is unchanged) | reference (both drawn
    # as the reference initialises its unused slots, Kaiming-uniform bounds 1/sqrt(cap) and 1/sqrt(fan_in))
    growth: str = "zero_u"
    stage: int = 1  # 1: grow then compress and continue at fixed rank; 2: start from stage1_ckpt
    stage1_ckpt: str | None = None
    # federated mode only (fedlowrank.federated.rankadapt: the server adapts the aggregate, in rounds)
    warmup_rounds: int = 0  # rounds before the first rank check
    check_rounds: int = 1  # rounds between rank checks
    shrink: bool = True  # also truncate layers whose explained rank fell
    slack: int = 2  # shrink only when k + buffer + slack < R (no grow/shrink flapping)

    def validate(self) -> None:
        if self.rule not in ("variance", "energy"):
            raise ValueError(f"method.rule must be variance|energy, got {self.rule!r}")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"method.threshold must be in (0, 1], got {self.threshold}")
        if self.init_rank < 1 or self.buffer < 0:
            raise ValueError("method.init_rank must be >= 1 and method.buffer >= 0")
        if self.check_interval < 1 or self.stage1_steps < 1 or self.warmup_steps < 0:
            raise ValueError("method.check_interval and method.stage1_steps must be >= 1, warmup_steps >= 0")
        if not 0.0 < self.max_rank_ratio <= 1.0:
            raise ValueError(f"method.max_rank_ratio must be in (0, 1], got {self.max_rank_ratio}")
        if self.growth not in ("zero_u", "reference"):
            raise ValueError(f"method.growth must be zero_u|reference, got {self.growth!r}")
        if self.stage not in (1, 2):
            raise ValueError(f"method.stage must be 1 or 2, got {self.stage}")
        if self.warmup_rounds < 0 or self.check_rounds < 1 or self.slack < 0:
            raise ValueError("method.warmup_rounds and method.slack must be >= 0, method.check_rounds >= 1")
        if self.stage == 2 and not self.stage1_ckpt:
            raise ValueError("method.stage=2 needs method.stage1_ckpt (a stage-1 compressed checkpoint)")

    def validate_federated(self) -> None:
        """``method=inrank`` in federated mode: this schema, stage 1 only (the schedule is in rounds:
        ``warmup_rounds``, ``check_rounds``; ``shrink``/``slack``; the step keys are unused there)."""
        self.validate()
        if self.stage != 1 or self.stage1_ckpt:
            raise ValueError("method.stage=2 / stage1_ckpt are central InRank; federated InRank adapts ranks every "
                             "round (continue a run with fed.resume)")


def describe_growth(changes: dict[str, tuple[int, int]], shown: int = 6) -> str:
    """``grew N layers: a 18->32, ...``, naming at most ``shown`` layers and saying how many more there are."""
    items = [f"{n} {a}->{b}" for n, (a, b) in changes.items()]
    more = f", and {len(items) - shown} more" if len(items) > shown else ""
    return f"grew {len(items)} layer{'s' if len(items) != 1 else ''}: " + ", ".join(items[:shown]) + more


class InRank:
    """Rank-growth policy acting on the factorized layers of a model.

    As the reference (``InRankEfficient._rank_determination``), each layer keeps its explained rank k across
    checks: a check searches only the window ``[k, min(k + buffer, cap - buffer))`` for the first index whose
    explained ratio passes the threshold (the window's last index when none does), so k never decreases and
    grows by at most ``buffer`` per check; the layer trains at ``k + buffer`` slots, and stage 2 keeps exactly
    k (:meth:`compressed_ranks`). ``kept`` is saved with the trainer state and survives a resume."""

    def __init__(self, cfg: InRankConfig, seed: int = 0) -> None:
        cfg.validate()
        self.cfg, self.seed = cfg, seed
        self.history: list[dict] = []
        self.kept: dict[str, int] = {}  # layer -> explained rank k kept across checks (reference current_modes)

    def _cap(self, layer) -> int:
        return max(1, int(self.cfg.max_rank_ratio * layer.full_rank))

    def explained(self, layer) -> int:
        """The layer's explained-ratio rank under ``cfg.rule``, over its whole spectrum (no window)."""
        S = layer.spectrum()
        if self.cfg.rule == "variance":
            return explained_variance_rank(S, self.cfg.threshold, n_total=layer.full_rank)
        return explained_rank(S, self.cfg.threshold)

    def _passes(self, layer) -> list[bool]:
        """Per k = 0..n: whether keeping the k leading singular values explains more than the threshold."""
        S = layer.spectrum()
        if self.cfg.rule == "variance":
            return (explained_variance_ratios(S, n_total=layer.full_rank) > self.cfg.threshold).tolist()
        return (explained_energy_ratios(S) >= self.cfg.threshold - 1e-12).tolist()

    def search(self, name: str, layer) -> int:
        """The reference's windowed search from the kept rank (see the class docstring)."""
        k, b = self.kept.get(name, self.cfg.init_rank), self.cfg.buffer
        hi = min(k + b, self._cap(layer) - b)
        if k >= hi:  # at the cap (or no window): the reference stops searching
            return k
        passes = self._passes(layer)
        return next((i for i in range(k, hi) if i < len(passes) and passes[i]), hi - 1)

    def prepare(self, model: nn.Module) -> dict[str, int]:
        """Set every factorized layer to ``init_rank + buffer`` (capped); every kept rank to ``init_rank``."""
        ranks = {}
        for name, layer in lowrank_modules(model).items():
            layer.set_rank(min(self._cap(layer), self.cfg.init_rank + self.cfg.buffer))
            ranks[name] = layer.rank
            self.kept[name] = self.cfg.init_rank
        return ranks

    def due(self, step: int) -> bool:
        """Whether ranks are checked after optimizer step ``step`` (1-based count of steps done)."""
        c = self.cfg
        return step <= c.stage1_steps and step >= c.warmup_steps and step % c.check_interval == 0

    @torch.no_grad()
    def targets(self, model: nn.Module) -> dict[str, int]:
        """Per layer: min(cap, k + buffer) with k from the windowed search (nothing is kept yet: see
        :meth:`keep`, which every process calls with the same targets)."""
        return {name: min(self._cap(layer), self.search(name, layer) + self.cfg.buffer)
                for name, layer in lowrank_modules(model).items()}

    def keep(self, targets: dict[str, int]) -> None:
        """Record the kept ranks ``target - buffer`` (never lower than before)."""
        for name, target in targets.items():
            self.kept[name] = max(self.kept.get(name, self.cfg.init_rank), target - self.cfg.buffer)

    @torch.no_grad()
    def apply(self, model: nn.Module, ranks: dict[str, int], step: int) -> set[str]:
        """Grow the named layers to ``ranks``. New slots come from a generator seeded by
        (seed, step, layer), so every process grows identically. Returns params needing a state reset (none)."""
        layers = lowrank_modules(model)
        changes = {}
        for i, name in enumerate(sorted(ranks)):
            layer, target = layers[name], ranks[name]
            if target > layer.rank:
                g = growth_generator(self.seed, step, i)
                changes[name] = (layer.rank, target)
                layer.grow(target, generator=g)
                if self.cfg.growth == "reference":
                    self._reference_slots(layer, changes[name][0], g)
        if changes:
            log.info("InRank step %d: %s", step, describe_growth(changes))
        self.history.append({"step": step, "changes": {n: list(v) for n, v in changes.items()}})
        return set()

    def _reference_slots(self, layer, r0: int, g: torch.Generator) -> None:
        """Slots r0.. drawn as the reference's never-used columns of B (U) and rows of A (V) are:
        Kaiming-uniform with a=sqrt(5), i.e. bounds 1/sqrt(cap) and 1/sqrt(fan_in). Changes the function."""
        U, V = layer.U, layer.V
        bu, bv = 1.0 / math.sqrt(self._cap(layer)), 1.0 / math.sqrt(V.shape[1])
        newU = (torch.rand(U.shape[0], U.shape[1] - r0, generator=g, dtype=torch.float64) * 2 - 1) * bu
        newV = (torch.rand(V.shape[0] - r0, V.shape[1], generator=g, dtype=torch.float64) * 2 - 1) * bv
        U[:, r0:] = newU.to(U.device, U.dtype)
        V[r0:, :] = newV.to(V.device, V.dtype)

    def update(self, model: nn.Module, step: int) -> dict[str, int]:
        """targets + keep + apply in one process (no distributed agreement needed). Returns new ranks."""
        targets = self.targets(model)
        self.keep(targets)
        grow = {n: r for n, r in targets.items() if r > lowrank_modules(model)[n].rank}
        self.apply(model, grow, step)
        return grow

    @torch.no_grad()
    def compressed_ranks(self, model: nn.Module) -> dict[str, int]:
        """Stage-2 ranks: every layer's kept rank k, as the reference (its explained rank over the whole
        spectrum where nothing was kept)."""
        return {name: max(1, min(layer.rank, self.kept[name] if name in self.kept else self.explained(layer)))
                for name, layer in lowrank_modules(model).items()}

    @torch.no_grad()
    def compress(self, model: nn.Module, ranks: dict[str, int] | None = None) -> set[str]:
        """End of stage 1: truncate layers to ``ranks`` (default: :meth:`compressed_ranks`), optimally via
        the thin SVD. Returns the parameter names whose optimizer state must restart (rotated basis)."""
        ranks = ranks if ranks is not None else self.compressed_ranks(model)
        reset = set()
        for name, layer in lowrank_modules(model).items():
            layer.truncate(ranks[name])
            reset |= {f"{name}.U", f"{name}.V"}
        return reset
