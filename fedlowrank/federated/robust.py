"""Defences against hostile or broken clients: reply checks, bounded weights, update-norm
clipping, and coordinate-wise median / trimmed-mean aggregation of factors.

Median and trimmed mean need every contribution to a coordinate to mean the same thing. That
holds for ``fedlmt`` (one rank for all) and ``slice`` (rank slot j is averaged over the clients
that trained it, so the robust statistic is taken slot by slot); ``product`` re-factorizes a
weighted sum of products and ReLoRA merges adapter products, so those support clipping only.
"""
from __future__ import annotations

import math
import statistics

import torch
from torch import Tensor

from .aggregation import State, factor_prefixes

ROBUST = ("none", "median", "trimmed_mean")
REQUIRED_METRICS = ("train_loss", "num-examples", "rank_sum", "rank_ratio")
# what a client may report (fedlowrank.federated.client.local_train); anything else is dropped
CLIENT_METRICS = frozenset({*REQUIRED_METRICS, "train_accuracy", "steps", "partition_id", "params", "trainable_params"})
# what the server writes beside them: a reply that sets one is rejected
RESERVED_METRICS = frozenset({"pid", "weight", "update_norm", "sim_time_s", "clipped_rms"})
MAX_METRIC_KEYS = 64


class RejectedReply(ValueError):
    """A client reply the server will not aggregate (the message says why)."""


def check_metrics(metrics: dict, max_abs: float, partition_id: int | None = None) -> dict[str, float]:
    """The whitelisted metrics (:data:`CLIENT_METRICS`), finite, with the required keys and plausible magnitudes,
    or :class:`RejectedReply`: too many keys, a reserved key, or a ``partition_id`` other than the server's."""
    if len(metrics) > MAX_METRIC_KEYS:
        raise RejectedReply(f"{len(metrics)} metric keys (at most {MAX_METRIC_KEYS})")
    reserved = sorted(RESERVED_METRICS & set(metrics))
    if reserved:
        raise RejectedReply(f"metrics set server-reserved key(s) {reserved}")
    missing = [k for k in REQUIRED_METRICS if k not in metrics]
    if missing:
        raise RejectedReply(f"metrics lack {missing}")
    out = {}
    for k, v in metrics.items():
        if k not in CLIENT_METRICS:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise RejectedReply(f"metric {k!r} is not a number ({type(v).__name__})")
        v = float(v)
        if not math.isfinite(v) or abs(v) > max(max_abs, 1e12):
            raise RejectedReply(f"metric {k!r} = {v} is not finite or out of range")
        out[k] = v
    if partition_id is not None and "partition_id" in out and out["partition_id"] != partition_id:
        raise RejectedReply(f"metrics claim partition {out['partition_id']:g}, the server gave {partition_id}")
    if out["num-examples"] <= 0 or not 0.0 <= out["rank_ratio"] <= 1.0 or out["train_loss"] < 0:
        raise RejectedReply(f"implausible metrics num-examples={out['num-examples']} "
                            f"rank_ratio={out['rank_ratio']} train_loss={out['train_loss']}")
    return out


def check_values(update: State, expected_dtypes: dict[str, torch.dtype], max_abs: float) -> None:
    """Dtypes as sent and magnitudes below ``max_abs`` (finite, shape and key checks are in validate_update)."""
    for k, t in update.items():
        want = expected_dtypes.get(k)
        if want is not None and t.dtype != want:
            raise RejectedReply(f"{k} has dtype {t.dtype}, expected {want}")
        if t.is_floating_point() and t.numel() and float(t.abs().max()) > max_abs:
            raise RejectedReply(f"{k} has values of magnitude {float(t.abs().max()):.3g} > {max_abs:g}")


def bounded_weight(reported: float, known: int | None, cap: float) -> float:
    """Aggregation weight: the client's count, never above what the server knows (its partition
    size) or the cap."""
    w = min(reported, float(cap))
    return min(w, float(known)) if known is not None else w


def clip_update(view: State, update: State, max_norm: float) -> tuple[State, float]:
    """Scale the client's change ``update - view`` to L2 norm <= ``max_norm`` (keys the view lacks,
    e.g. fresh adapters, count from zero). Returns (clipped update, original norm)."""
    deltas = {k: u.double() - (view[k].double() if k in view and view[k].shape == u.shape else 0.0)
              for k, u in update.items() if u.is_floating_point()}
    norm = math.sqrt(sum(float(d.square().sum()) for d in deltas.values()))
    if norm <= max_norm:
        return update, norm
    s = max_norm / norm
    out = dict(update)
    for k, d in deltas.items():
        base = update[k].double() - d
        out[k] = (base + s * d).to(update[k].dtype)
    return out, norm


def change_rms(view: State, update: State) -> tuple[float, int]:
    """(RMS of the client's change ``update - view`` per element, elements): a budget-invariant size."""
    _, norm = clip_update(view, update, math.inf)
    n = sum(u.numel() for u in update.values() if u.is_floating_point())
    return norm / math.sqrt(max(1, n)), n


def clip_to_median(pairs: list[tuple[State, State]], factor: float) -> tuple[list[State], list[float | None]]:
    """Clip each (view, update) change whose RMS exceeds ``factor`` x the median RMS of the round (the smallest
    when fewer than 3 changes: one of two may be hostile) to that bound. Returns the updates and, per update,
    the RMS it had when it was clipped (None when untouched)."""
    sizes = [change_rms(v, u) for v, u in pairs]
    rms = [r for r, _ in sizes]
    bound = factor * (statistics.median(rms) if len(rms) >= 3 else min(rms))
    out, clipped = [], []
    for (view, update), (r, n) in zip(pairs, sizes):
        if r > bound and r > 0:
            out.append(clip_update(view, update, bound * math.sqrt(max(1, n)))[0])
            clipped.append(r)
        else:
            out.append(update)
            clipped.append(None)
    return out, clipped


def _reduce(stack: Tensor, kind: str, trim: float) -> Tensor:
    """Coordinate-wise median or trimmed mean over dim 0 (the clients)."""
    n = stack.shape[0]
    if kind == "median":
        return stack.median(dim=0).values if n % 2 else stack.sort(dim=0).values[n // 2 - 1: n // 2 + 1].mean(0)
    k = min(int(math.floor(trim * n)), (n - 1) // 2)
    return stack.sort(dim=0).values[k: n - k].mean(0)


def robust_aggregate(global_state: State, updates: list[State], rule: str, kind: str, trim: float = 0.1) -> State:
    """Coordinate-wise ``kind`` (median | trimmed_mean) of the updates, unweighted, slot by slot for
    ``slice`` factors (slots nobody trained keep their value)."""
    if rule not in ("fedlmt", "slice", "fedavg"):
        raise ValueError(f"robust aggregation {kind!r} needs rule fedlmt or slice, not {rule!r}")
    pref = factor_prefixes(global_state)
    fkeys = {f"{p}.{s}" for p in pref for s in "UV"}
    new: State = {}
    for k, g in global_state.items():
        if k in fkeys:
            continue
        new[k] = (_reduce(torch.stack([u[k].to(g.dtype) for u in updates]), kind, trim) if g.is_floating_point()
                  else updates[0][k].clone())
    for p in pref:
        U, V = global_state[f"{p}.U"].clone(), global_state[f"{p}.V"].clone()
        ranks = [u[f"{p}.U"].shape[1] for u in updates]
        lo = 0
        for hi in sorted(set(ranks)):  # slots [lo, hi) were trained by every client with rank >= hi
            idx = [i for i, r in enumerate(ranks) if r >= hi]
            U[:, lo:hi] = _reduce(torch.stack([updates[i][f"{p}.U"][:, lo:hi].to(U.dtype) for i in idx]), kind, trim)
            V[lo:hi] = _reduce(torch.stack([updates[i][f"{p}.V"][lo:hi].to(V.dtype) for i in idx]), kind, trim)
            lo = hi
        new[f"{p}.U"], new[f"{p}.V"] = U, V
    return {k: new[k] for k in global_state}
