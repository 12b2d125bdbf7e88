"""Clipping a client's change (``update - view``, the view being what it downloaded).

``fed.clip_norm`` clips to a fixed L2 norm (:func:`clip_update`). ``fed.clip_auto`` (on by default) derives its
bound from the round's honest majority (:func:`clip_auto`), on *comparable groups* of coordinates: each dense
tensor that every client holds at one shape, and each slot group ``[lo, hi)`` of a factorized layer (columns of
U, rows of V) trained by at least 3 clients. A client whose change on some group is more than ``factor`` x the
median of that group's changes has its whole change scaled down until none is (one scale, so its direction is
kept). Slots fewer than 3 clients trained (the top slots of the only full-budget client) have no median; there,
each contributor's change is capped at ``factor`` x the median *relative* change (change RMS / RMS of the
downloaded values) of the layer's well-trained slots, times the RMS of the downloaded values of those slots.
Sizes are per-element RMS, so budgets of different sizes compare.
"""
from __future__ import annotations

import math
import statistics

import torch
from torch import Tensor

from .aggregation import State, factor_prefixes

MIN_CONTRIBUTORS = 3  # a group with fewer contributors has no trustworthy median


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


def _rms(t: Tensor) -> float:
    return math.sqrt(float(t.double().square().mean())) if t.numel() else 0.0


def _slots(state: State, p: str, lo: int, hi: int) -> Tensor:
    """Slots [lo, hi) of layer ``p`` as one flat vector: U[:, lo:hi] then V[lo:hi]  # (out*k + k*in,)"""
    return torch.cat([state[f"{p}.U"][:, lo:hi].reshape(-1), state[f"{p}.V"][lo:hi].reshape(-1)]).double()


def slot_groups(ranks: list[int]) -> list[tuple[int, int, list[int]]]:
    """(lo, hi, contributors): slots [lo, hi) of a layer are trained by every client whose rank is >= hi."""
    out, lo = [], 0
    for hi in sorted(set(ranks)):
        out.append((lo, hi, [i for i, r in enumerate(ranks) if r >= hi]))
        lo = hi
    return out


def _layers(pairs: list[tuple[State, State]]) -> dict[str, list[tuple[int, int, list[int]]]]:
    """Factorized layers whose views and updates agree in shape (methods that reshape factors are left out),
    with their slot groups."""
    out = {}
    for p in factor_prefixes(pairs[0][1]):
        if all(f"{p}.U" in v and f"{p}.U" in u and v[f"{p}.U"].shape == u[f"{p}.U"].shape
               and v[f"{p}.V"].shape == u[f"{p}.V"].shape for v, u in pairs):
            out[p] = slot_groups([u[f"{p}.U"].shape[1] for _, u in pairs])
    return out


def excess(pairs: list[tuple[State, State]], min_contributors: int = MIN_CONTRIBUTORS) -> list[float]:
    """Per client, the largest ratio of its change RMS to the median over contributors, across comparable groups
    (with fewer than ``min_contributors`` clients in the round, the smallest change is the reference: one of two
    may be hostile). 0 when a client has no comparable group."""
    n, layers = len(pairs), _layers(pairs)
    fkeys = {f"{p}.{s}" for p in layers for s in "UV"}
    groups: list[dict[int, float]] = []
    first = pairs[0][1]
    for k, t in first.items():
        if k not in fkeys and t.is_floating_point() and all(k in v and k in u and v[k].shape == u[k].shape == t.shape
                                                            for v, u in pairs):
            groups.append({i: _rms(u[k].double() - v[k].double()) for i, (v, u) in enumerate(pairs)})
    for p, gs in layers.items():
        for lo, hi, cs in gs:
            if len(cs) >= min(min_contributors, n):
                groups.append({i: _rms(_slots(pairs[i][1], p, lo, hi) - _slots(pairs[i][0], p, lo, hi)) for i in cs})
    ratios = [0.0] * n
    for g in groups:
        ref = statistics.median(g.values()) if len(g) >= min_contributors else min(g.values())
        for i, r in g.items():
            ratios[i] = max(ratios[i], r / ref if ref > 0 else (math.inf if r > 0 else 0.0))
    return ratios


def _scale_change(view: State, update: State, s: float) -> State:
    return {k: ((view[k].double() + s * (t.double() - view[k].double())).to(t.dtype)
                if t.is_floating_point() and k in view and view[k].shape == t.shape else t) for k, t in update.items()}


def _cap_thin_slots(pairs: list[tuple[State, State]], factor: float, min_contributors: int) -> list[int]:
    """Cap, in place, each contributor's change on slots fewer than ``min_contributors`` clients trained (see the
    module docstring). Returns how many slot groups were capped per client."""
    n, capped = len(pairs), [0] * len(pairs)
    for p, gs in _layers(pairs).items():
        wide = [(lo, hi) for lo, hi, cs in gs if len(cs) >= min_contributors] or [gs[0][:2]]
        rel = []
        for v, u in pairs:
            d = torch.cat([_slots(u, p, lo, hi) - _slots(v, p, lo, hi) for lo, hi in wide])
            w = torch.cat([_slots(v, p, lo, hi) for lo, hi in wide])
            rel.append(_rms(d) / max(_rms(w), 1e-12))
        ref = statistics.median(rel) if n >= min_contributors else min(rel)
        for lo, hi, cs in gs:
            if len(cs) >= min_contributors:
                continue
            for i in cs:
                v, u = pairs[i]
                r, bound = _rms(_slots(u, p, lo, hi) - _slots(v, p, lo, hi)), factor * ref * _rms(_slots(v, p, lo, hi))
                if r > bound:
                    s, u = bound / r, dict(u)
                    for key, sl in ((f"{p}.U", (slice(None), slice(lo, hi))), (f"{p}.V", (slice(lo, hi),))):
                        t, base = u[key].clone(), v[key][sl].double()
                        t[sl] = (base + s * (t[sl].double() - base)).to(t.dtype)
                        u[key] = t
                    pairs[i], capped[i] = (v, u), capped[i] + 1
    return capped


def clip_auto(pairs: list[tuple[State, State]], factor: float, min_contributors: int = MIN_CONTRIBUTORS
              ) -> tuple[list[State], list[float | None], list[int]]:
    """``fed.clip_auto``: scale each (view, update) change so that no comparable group exceeds ``factor`` x its
    median, then cap thinly trained slots. Returns the updates, per update the excess ratio it had when it was
    scaled (None when untouched), and per update the number of thin slot groups capped."""
    ratios = excess(pairs, min_contributors)
    scaled = [r if r > factor else None for r in ratios]
    out = [(v, _scale_change(v, u, factor / r) if r > factor else u) for (v, u), r in zip(pairs, ratios)]
    capped = _cap_thin_slots(out, factor, min_contributors)
    return [u for _, u in out], scaled, capped
