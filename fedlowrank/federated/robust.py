"""Defences against hostile or broken clients: reply checks, bounded weights, update-norm
clipping, coordinate-wise median / trimmed-mean aggregation of factors, and Krum (Flower's) over whole models.

Median and trimmed mean need every contribution to a coordinate to mean the same thing. That
holds for ``fedlmt`` (one rank for all) and ``slice`` (rank slot j is averaged over the clients
that trained it, so the robust statistic is taken slot by slot); ``product`` re-factorizes a
weighted sum of products and ReLoRA merges adapter products, so those support clipping only.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from flwr.server.strategy.aggregate import aggregate_krum
from torch import Tensor

from .aggregation import State, factor_prefixes
from .clipping import slot_groups

REQUIRED_METRICS = ("train_loss", "num-examples", "rank_sum", "rank_ratio")
# what a client may report (fedlowrank.federated.client.local_train); anything else is dropped
CLIENT_METRICS = frozenset({*REQUIRED_METRICS, "train_accuracy", "steps", "partition_id", "params", "trainable_params"})
# what the server writes beside them: a reply that sets one is rejected
RESERVED_METRICS = frozenset({"pid", "weight", "update_norm", "sim_time_s", "clipped_excess", "clipped_slots"})
MAX_METRIC_KEYS = 64
NPY_HEADER_SLACK = 4096  # bytes an Array's .npy header may add to its raw data


def record_bytes(record) -> int:
    """Bytes a Flower ArrayRecord holds, from its Arrays' serialized data (nothing is deserialized)."""
    return sum(len(record[k].data) for k in record.keys())


def check_record(record, expected: dict[str, tuple[int, ...]], dtypes: dict[str, torch.dtype],
                 max_bytes: float) -> int:
    """Check a reply's ArrayRecord from its metadata before a single array is deserialized: total size at most
    ``max_bytes`` (``fed.max_reply_mb``), exactly the expected keys, each with the expected declared shape and
    dtype and no more bytes than that shape needs (plus a .npy header). Returns the size, else
    :class:`RejectedReply`."""
    size = record_bytes(record)
    if size > max_bytes:
        raise HostileReply(f"reply of {size / 2**20:.1f} MB exceeds fed.max_reply_mb={max_bytes / 2**20:g}")
    keys = set(record.keys())
    if keys != set(expected):
        raise HostileReply(f"key mismatch: missing={sorted(set(expected) - keys)[:5]} "
                            f"extra={sorted(keys - set(expected))[:5]}")
    for k, shape in expected.items():
        arr, want = record[k], dtypes.get(k, torch.float32)
        want_np = str(torch.empty(0, dtype=want).numpy().dtype)
        if tuple(arr.shape) != tuple(shape) or str(arr.dtype) != want_np:
            raise HostileReply(f"{k} declares shape {tuple(arr.shape)} {arr.dtype}, expected {tuple(shape)} {want_np}")
        limit = math.prod(shape) * torch.empty(0, dtype=want).element_size() + NPY_HEADER_SLACK
        if len(arr.data) > limit:
            raise HostileReply(f"{k} carries {len(arr.data)} bytes, more than its shape {tuple(shape)} needs")
    return size


class RejectedReply(ValueError):
    """A client reply the server will not aggregate (the message says why)."""


class HostileReply(RejectedReply):
    """A reply no honest client sends, whatever its data: another size, keys, shapes or dtypes than it was sent, or
    values beyond the bound (honest replies stay below 14 % of it). ``fed.screen=exclude`` excludes its sender."""


def check_metrics(metrics: dict, max_abs: float, partition_id: int | None = None) -> dict[str, float]:
    """The whitelisted metrics (:data:`CLIENT_METRICS`), finite, with the required keys and plausible magnitudes,
    or :class:`RejectedReply`: too many keys, a value that is not a single number (a list, under any key), a
    reserved key, or a ``partition_id`` other than the server's."""
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
        if isinstance(v, bool) or not isinstance(v, (int, float)):  # lists (MetricRecord allows them) too
            size = f" of {len(v)}" if isinstance(v, list) else ""
            raise RejectedReply(f"metric {str(k)[:40]!r} is not a number ({type(v).__name__}{size})")
        if k not in CLIENT_METRICS:
            continue
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


def value_bounds(view: State, max_abs: float, max_ratio: float) -> dict[str, float]:
    """Per downloaded tensor, the largest magnitude a reply may hold there: ``max_ratio`` x its largest downloaded
    value (x the download's largest where the tensor is all zeros), never above ``max_abs``."""
    floats = {k: float(v.abs().max()) for k, v in view.items() if v.is_floating_point() and v.numel()}
    top = max(floats.values(), default=0.0)
    return {k: min(max_abs, max_ratio * (m if m > 0 else top)) if (m > 0 or top > 0) else max_abs
            for k, m in floats.items()}


def check_values(update: State, expected_dtypes: dict[str, torch.dtype], max_abs: float,
                 bounds: dict[str, float] | None = None) -> None:
    """Dtypes as sent and magnitudes within ``bounds`` (per key, :func:`value_bounds`; ``max_abs`` for keys
    without one). Finite, shape and key checks are in validate_update."""
    bounds = bounds or {}
    for k, t in update.items():
        want = expected_dtypes.get(k)
        if want is not None and t.dtype != want:
            raise HostileReply(f"{k} has dtype {t.dtype}, expected {want}")
        limit = bounds.get(k, max_abs)
        if t.is_floating_point() and t.numel() and float(t.abs().max()) > limit:
            what = "" if limit == max_abs else " (fed.max_abs_ratio x its largest downloaded value)"
            raise HostileReply(f"{k} has values of magnitude {float(t.abs().max()):.3g} > {limit:.3g}{what}")


def bounded_weight(reported: float, known: int | None, cap: float) -> float:
    """Aggregation weight: the client's count, never above what the server knows (its partition
    size) or the cap."""
    w = min(reported, float(cap))
    return min(w, float(known)) if known is not None else w


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
        for lo, hi, idx in slot_groups(ranks):
            U[:, lo:hi] = _reduce(torch.stack([updates[i][f"{p}.U"][:, lo:hi].to(U.dtype) for i in idx]), kind, trim)
            V[lo:hi] = _reduce(torch.stack([updates[i][f"{p}.V"][lo:hi].to(V.dtype) for i in idx]), kind, trim)
        new[f"{p}.U"], new[f"{p}.V"] = U, V
    return {k: new[k] for k in global_state}


def krum(updates: list[State], f: int) -> State:
    """Krum (Blanchard et al. 2017) by Flower's ``aggregate_krum``: the one update whose summed squared distance to
    its ``n - f - 2`` nearest others is smallest (at least 1 neighbour; its guarantee needs ``n >= 2f + 3``).
    Every update must have the same keys and shapes (``fedavg``, ``fedlmt``)."""
    keys = list(updates[0])
    if any(list(u) != keys or any(u[k].shape != updates[0][k].shape for k in keys) for u in updates):
        raise ValueError("fed.robust=krum needs every update in the same keys and shapes")
    floats = [k for k in keys if updates[0][k].is_floating_point()]
    arrays = [([u[k].double().numpy() for k in floats], 1) for u in updates]
    chosen = aggregate_krum(arrays, f, 0)
    pick = next(i for i, (a, _) in enumerate(arrays) if all(x is y for x, y in zip(a, chosen)))
    return {k: updates[pick][k].clone() for k in keys}
