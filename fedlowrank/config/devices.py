"""``fed.devices``: how the simulated client population is drawn, and the rank budget each device affords
(the time model is :mod:`fedlowrank.federated.devices`)."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

DISTRIBUTIONS = ("none", "uniform", "lognormal", "tiers", "list")


@dataclass
class DevicesConfig:
    """``fed.devices``: how the client population is drawn."""

    distribution: str = "none"  # none | uniform | lognormal | tiers | list
    flops: float = 1e10  # median compute (FLOP/s)
    up_bps: float = 1e6  # median upload bandwidth (bytes/s)
    down_bps: float = 1e7  # median download bandwidth (bytes/s)
    memory: float = 1e8  # median memory (bytes)
    spread: float = 10.0  # fastest / slowest device (uniform: exact range on a log scale; lognormal: 5-95 %)
    tiers: list[float] = field(default_factory=lambda: [0.1, 0.3, 1.0])  # tiers: fractions of the median
    devices: list[dict] = field(default_factory=list)  # list: one {flops, up_bps, down_bps, memory} per client
    seed: int = 0
    budget_from: str = "none"  # none | memory | compute: derive each client's rank ratio from its device
    deadline_s: float | None = None  # drop clients slower than this (seconds per round)

    def validate(self) -> None:
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"fed.devices.distribution must be one of {DISTRIBUTIONS}, got {self.distribution!r}")
        for k in ("flops", "up_bps", "down_bps", "memory"):
            if not getattr(self, k) > 0:
                raise ValueError(f"fed.devices.{k} must be > 0, got {getattr(self, k)}")
        if not self.spread >= 1:
            raise ValueError(f"fed.devices.spread must be >= 1, got {self.spread}")
        if self.distribution == "tiers" and (not self.tiers or any(not t > 0 for t in self.tiers)):
            raise ValueError(f"fed.devices.tiers must be positive fractions, got {self.tiers}")
        if self.budget_from not in ("none", "memory", "compute"):
            raise ValueError(f"fed.devices.budget_from must be none|memory|compute, got {self.budget_from!r}")
        if self.deadline_s is not None and not self.deadline_s > 0:
            raise ValueError(f"fed.devices.deadline_s must be > 0 (or null), got {self.deadline_s}")
        keys = {"flops", "up_bps", "down_bps", "memory"}
        for i, d in enumerate(self.devices):
            if set(d) != keys or any(not float(v) > 0 for v in d.values()):
                raise ValueError(f"fed.devices.devices[{i}] must give positive {sorted(keys)}, got {d}")


@dataclass
class DeviceProfile:
    flops: float  # sustained training FLOP/s
    up_bps: float  # upload bytes/s
    down_bps: float  # download bytes/s
    memory: float  # bytes available for the model, its gradients and optimizer state


def population(cfg: DevicesConfig, n: int) -> list[DeviceProfile] | None:
    """``n`` device profiles drawn from ``cfg`` (deterministic for ``cfg.seed``); None for ``none``.
    One factor per client scales compute, bandwidth and memory together (a slow device is slow at all)."""
    if cfg.distribution == "none":
        return None
    if cfg.distribution == "list":
        if len(cfg.devices) != n:
            raise ValueError(f"fed.devices.devices lists {len(cfg.devices)} devices for {n} clients")
        return [DeviceProfile(float(d["flops"]), float(d["up_bps"]), float(d["down_bps"]), float(d["memory"]))
                for d in cfg.devices]
    rng = random.Random(cfg.seed)
    half = math.log(cfg.spread) / 2
    if cfg.distribution == "uniform":
        scales = [math.exp(rng.uniform(-half, half)) for _ in range(n)]
    elif cfg.distribution == "lognormal":
        sigma = half / 1.6449  # 5 % and 95 % quantiles at spread^(∓1/2)
        scales = [math.exp(rng.gauss(0.0, sigma)) for _ in range(n)]
    else:  # tiers: client i in tier i % len
        scales = [cfg.tiers[i % len(cfg.tiers)] for i in range(n)]
    return [DeviceProfile(cfg.flops * s, cfg.up_bps * s, cfg.down_bps * s, cfg.memory * s) for s in scales]


def budget_ratio(profile: DeviceProfile, cfg: DevicesConfig, levels: list[float]) -> float:
    """The largest configured rank ratio whose cost fits the device: ``memory`` (ratio ≤ memory / median
    memory) or ``compute`` (ratio ≤ flops / median flops). The smallest level when none fits."""
    have = profile.memory / cfg.memory if cfg.budget_from == "memory" else profile.flops / cfg.flops
    fitting = [b for b in sorted(levels) if b <= have + 1e-12]
    return fitting[-1] if fitting else min(levels)
