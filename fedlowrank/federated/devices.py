"""Device heterogeneity for simulated federated training: a seeded client population (compute speed,
up/down bandwidth, memory), rank budgets derived from it, and each round's simulated wall-clock time
from FLOPs (the project's FLOP accounting) and bytes, with an optional straggler deadline.

Time model, per sampled client k:  t_k = down_bytes_k / down_bps_k + train_flops_k / flops_k
+ up_bytes_k / up_bps_k. A round lasts max_k t_k; with a deadline D, clients with t_k > D are
dropped (their updates are not aggregated) and the round lasts D whenever anyone was dropped.
"""
from __future__ import annotations

from fedlowrank.config.devices import DISTRIBUTIONS, DeviceProfile, DevicesConfig, budget_ratio, population

__all__ = ["DISTRIBUTIONS", "DeviceProfile", "DevicesConfig", "budget_ratio", "client_time", "population"]


def client_time(profile: DeviceProfile, train_flops: float, down_bytes: float, up_bytes: float) -> float:
    """Simulated seconds for one client's round: download, local training, upload."""
    return down_bytes / profile.down_bps + train_flops / profile.flops + up_bytes / profile.up_bps


def round_clock(times: dict[int, float], deadline: float | None) -> tuple[float, list[int], list[int]]:
    """(round seconds, kept client ids, dropped client ids) for the clients' simulated times."""
    if not times:
        return 0.0, [], []
    if deadline is None:
        return max(times.values()), sorted(times), []
    kept = sorted(p for p, t in times.items() if t <= deadline)
    dropped = sorted(p for p, t in times.items() if t > deadline)
    return (deadline if dropped else max(times.values())), kept, dropped
