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
from dataclasses import dataclass

import torch
from torch import nn

from fedlowrank.lowrank import explained_rank, explained_variance_rank, lowrank_modules
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
    """Rank-growth policy acting on the factorized layers of a model."""

    def __init__(self, cfg: InRankConfig, seed: int = 0) -> None:
        cfg.validate()
        self.cfg, self.seed = cfg, seed
        self.history: list[dict] = []

    def _cap(self, layer) -> int:
        return max(1, int(self.cfg.max_rank_ratio * layer.full_rank))

    def explained(self, layer) -> int:
        """The layer's explained-ratio rank under ``cfg.rule``."""
        S = layer.spectrum()
        if self.cfg.rule == "variance":
            return explained_variance_rank(S, self.cfg.threshold, n_total=layer.full_rank)
        return explained_rank(S, self.cfg.threshold)

    def prepare(self, model: nn.Module) -> dict[str, int]:
        """Set every factorized layer to ``init_rank + buffer`` (capped)."""
        ranks = {}
        for name, layer in lowrank_modules(model).items():
            layer.set_rank(min(self._cap(layer), self.cfg.init_rank + self.cfg.buffer))
            ranks[name] = layer.rank
        return ranks

    def due(self, step: int) -> bool:
        """Whether ranks are checked after optimizer step ``step`` (1-based count of steps done)."""
        c = self.cfg
        return step <= c.stage1_steps and step >= c.warmup_steps and step % c.check_interval == 0

    @torch.no_grad()
    def targets(self, model: nn.Module) -> dict[str, int]:
        """Per layer: min(cap, explained rank + buffer), from the spectrum of the thin factors."""
        out = {}
        for name, layer in lowrank_modules(model).items():
            k = self.explained(layer)
            out[name] = min(self._cap(layer), k + self.cfg.buffer)
        return out

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
        if changes:
            log.info("InRank step %d: %s", step, describe_growth(changes))
        self.history.append({"step": step, "changes": {n: list(v) for n, v in changes.items()}})
        return set()

    def update(self, model: nn.Module, step: int) -> dict[str, int]:
        """targets + apply in one process (no distributed agreement needed). Returns new ranks."""
        grow = {n: r for n, r in self.targets(model).items() if r > lowrank_modules(model)[n].rank}
        self.apply(model, grow, step)
        return grow

    @torch.no_grad()
    def compressed_ranks(self, model: nn.Module) -> dict[str, int]:
        """Explained rank of every layer (stage-2 ranks)."""
        return {name: max(1, min(layer.rank, self.explained(layer)))
                for name, layer in lowrank_modules(model).items()}

    @torch.no_grad()
    def compress(self, model: nn.Module, ranks: dict[str, int] | None = None) -> set[str]:
        """End of stage 1: truncate layers to ``ranks`` (default: explained ranks), optimally via
        the thin SVD. Returns the parameter names whose optimizer state must restart (rotated basis)."""
        ranks = ranks if ranks is not None else self.compressed_ranks(model)
        reset = set()
        for name, layer in lowrank_modules(model).items():
            layer.truncate(ranks[name])
            reset |= {f"{name}.U", f"{name}.V"}
        return reset
