"""Heterogeneous-rank aggregation of factorized models, matching tensors by key.

A factorized layer appears in a state dict as ``<prefix>.U`` (m, r) and ``<prefix>.V`` (r, n);
everything else is an ordinary tensor. No rule needs to know the architecture.

Rules:
* ``fedlmt``: every client trains the same rank; FedAvg of U and V (FedLMT).
* ``slice``: client k trains the first r_k rank slots; each slot j is averaged over the
  clients with r_k > j (FjORD / HeteroFL style). Untrained slots keep their value.
* ``product``: the global layer is the best rank-R factorization of Σ_k w_k U_k V_k,
  computed exactly from the stacked factors (FedHM / FlexLoRA style), no dense matrix.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from fedlowrank.lowrank.layers import rank_from_budget
from fedlowrank.lowrank.spectrum import refactorize_sum, truncate_factors

State = dict[str, Tensor]


def factor_prefixes(state: State) -> list[str]:
    """Prefixes ``p`` with both ``p.U`` and ``p.V`` 2-D tensors in ``state``."""
    out = []
    for k, v in state.items():
        if k.endswith(".U") and v.ndim == 2:
            p = k[:-2]
            if f"{p}.V" in state and state[f"{p}.V"].ndim == 2:
                out.append(p)
    return out


def layer_ranks(state: State) -> dict[str, int]:
    return {p: state[f"{p}.U"].shape[1] for p in factor_prefixes(state)}


def budget_ranks(global_state: State, ratio: float | None = None, rank: int | None = None,
                 params: float | None = None) -> dict[str, int]:
    """Per-layer rank of a client budget, capped by the global model's rank."""
    out = {}
    for p in factor_prefixes(global_state):
        m, R = global_state[f"{p}.U"].shape
        n = global_state[f"{p}.V"].shape[1]
        out[p] = min(R, rank_from_budget(min(m, n), rank=rank, ratio=ratio, params=params, dims=(m, n)))
    return out


def client_view(global_state: State, ranks: dict[str, int], rule: str) -> State:
    """The model a client with per-layer ``ranks`` downloads.

    ``slice``/``fedlmt``: the first r slots. ``product``: the best rank-r approximation
    (factored SVD of the global factors, balanced).
    """
    out: State = {}
    pref = set(factor_prefixes(global_state))
    for k, v in global_state.items():
        p = k[:-2]
        if p in pref and k.endswith((".U", ".V")):
            continue
        out[k] = v.clone()
    for p in pref:
        U, V, r = global_state[f"{p}.U"], global_state[f"{p}.V"], ranks[p]
        if rule == "product" and r < U.shape[1]:
            Ur, Vr = truncate_factors(U, V, r)
        else:
            Ur, Vr = U[:, :r], V[:r]
        out[f"{p}.U"], out[f"{p}.V"] = Ur.contiguous().clone(), Vr.contiguous().clone()
    return out


def expected_shapes(view: State) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in view.items()}


def validate_update(update: State, expected: dict[str, tuple[int, ...]]) -> str | None:
    """Reason to reject a client update (missing/extra keys, wrong shape, non-finite), or None."""
    missing = sorted(set(expected) - set(update))
    extra = sorted(set(update) - set(expected))
    if missing or extra:
        return f"key mismatch: missing={missing[:5]} extra={extra[:5]}"
    for k, shape in expected.items():
        t = update[k]
        if tuple(t.shape) != shape:
            return f"shape mismatch for {k}: got {tuple(t.shape)}, expected {shape}"
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return f"non-finite values in {k}"
    return None


def normalise_weights(weights: list[float]) -> list[float]:
    """Weights scaled to sum to 1; negative, non-finite or all-zero weights are an error."""
    if not weights or any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise ValueError(f"aggregation weights must be non-negative with a positive sum, got {weights}")
    s = float(sum(weights))
    return [w / s for w in weights]


def aggregate(global_state: State, updates: list[State], weights: list[float], rule: str,
              views: list[State] | None = None) -> State:
    """New global state from validated client ``updates`` weighted by ``weights`` (e.g. #examples).

    ``product`` with ``views`` (what each client downloaded) aggregates each client's *change*:
    ``G + Σ_k w_k (U_k V_k − Ũ_k Ṽ_k)``, so the directions a small budget's truncated view left out
    keep their global value instead of shrinking every round (without views: ``Σ_k w_k U_k V_k``)."""
    if rule not in ("fedlmt", "slice", "product", "fedavg"):
        raise ValueError(f"unknown aggregation rule {rule!r}")
    if not updates:
        return {k: v.clone() for k, v in global_state.items()}
    w = normalise_weights(weights)
    pref = factor_prefixes(global_state)
    factor_keys = {f"{p}.{s}" for p in pref for s in "UV"}
    new: State = {}
    for k, g in global_state.items():  # ordinary tensors: FedAvg (ints: keep the first client's)
        if k in factor_keys:
            continue
        if g.is_floating_point():
            new[k] = sum(wi * u[k].to(g.dtype) for wi, u in zip(w, updates))  # type: ignore[assignment]
        else:
            new[k] = updates[0][k].clone()
    for p in pref:
        gU, gV = global_state[f"{p}.U"], global_state[f"{p}.V"]
        Us = [u[f"{p}.U"] for u in updates]
        Vs = [u[f"{p}.V"] for u in updates]
        if rule == "fedlmt":
            if any(U.shape != gU.shape for U in Us):
                raise ValueError(f"fedlmt needs every client at the global rank for {p}")
            new[f"{p}.U"] = sum(wi * U for wi, U in zip(w, Us))  # type: ignore[assignment]
            new[f"{p}.V"] = sum(wi * V for wi, V in zip(w, Vs))  # type: ignore[assignment]
        elif rule == "slice":
            new[f"{p}.U"], new[f"{p}.V"] = _slice_average(gU, gV, Us, Vs, w)
        elif views is None:
            U, V = refactorize_sum(Us, Vs, w, gU.shape[1])
            new[f"{p}.U"], new[f"{p}.V"] = U.to(gU.dtype), V.to(gV.dtype)
        else:  # all thin: [G, w_k·U_k, −w_k·Ũ_k] @ [V_g; V_k; Ṽ_k], inner size R + 2 Σ r_k
            lefts = [gU, *Us, *(v[f"{p}.U"] for v in views)]
            rights = [gV, *Vs, *(v[f"{p}.V"] for v in views)]
            U, V = refactorize_sum([x.double() for x in lefts], [x.double() for x in rights],
                                   [1.0, *w, *(-wi for wi in w)], gU.shape[1])
            new[f"{p}.U"], new[f"{p}.V"] = U.to(gU.dtype), V.to(gV.dtype)
    return {k: new[k] for k in global_state}  # keep key order


def without_each(global_state: State, updates: list[State], weights: list[float], rule: str) -> list[State] | None:
    """[the aggregate of ``updates`` without update j, for each j], in closed form for the averaging rules
    (``fedavg`` of a dense model, ``fedlmt``, ``slice``): sums over all clients, less client j's term, in float64 (a blown-up
    update cancels without leaving rounding error behind), cast to each tensor's dtype. Equals :func:`aggregate`
    of the other updates up to rounding. None where there is no closed form (``product``, fewer than 2 updates,
    a client whose removal leaves no weight)."""
    if rule not in ("fedavg", "fedlmt", "slice") or len(updates) < 2 or any(w <= 0 for w in weights):
        return None
    pref = factor_prefixes(global_state)
    if rule == "fedavg" and pref:  # aggregate() combines factors by their products there
        return None
    if rule == "fedlmt" and any(u[f"{p}.U"].shape != global_state[f"{p}.U"].shape for p in pref for u in updates):
        return None  # aggregate() raises there: leave the error to it
    w = torch.tensor(normalise_weights(weights), dtype=torch.float64)
    slots = {f"{p}.{s}" for p in pref for s in "UV"} if rule == "slice" else set()
    out: list[State] = [{} for _ in updates]
    for k, g in global_state.items():
        if k in slots:
            continue
        if not g.is_floating_point():  # aggregate() keeps the first update's: the first other one
            for j, o in enumerate(out):
                o[k] = updates[1 if j == 0 else 0][k].clone()
            continue
        terms = torch.stack([u[k].double() for u in updates])  # (n, *shape)
        wt = w.to(g.device).view(-1, *([1] * g.ndim))
        rest = ((wt * terms).sum(0) - wt * terms) / (1 - w).view_as(wt)  # (n, *shape): row j leaves j out
        for j, o in enumerate(out):
            o[k] = rest[j].to(g.dtype)
    for p in pref if rule == "slice" else []:
        for j, (U, V) in enumerate(_slices_without_each(global_state[f"{p}.U"], global_state[f"{p}.V"],
                                                         [u[f"{p}.U"] for u in updates],
                                                         [u[f"{p}.V"] for u in updates], w)):
            out[j][f"{p}.U"], out[j][f"{p}.V"] = U, V
    return [{k: o[k] for k in global_state} for o in out]


def _slices_without_each(gU: Tensor, gV: Tensor, Us: list[Tensor], Vs: list[Tensor], w: Tensor
                         ) -> list[tuple[Tensor, Tensor]]:
    """:func:`_slice_average` without client j, for each j at once: slot sums and weights less client j's; a slot
    no other client trained keeps its global value (decided by count, never by a float difference)."""
    (m, R), n = gU.shape, len(Us)
    mask = torch.zeros(n, R, dtype=torch.float64, device=gU.device)  # (n, R): slot trained by client i
    TU = gU.new_zeros((n, m, R), dtype=torch.float64)
    TV = gV.new_zeros((n, R, gV.shape[1]), dtype=torch.float64)
    for i, (U, V) in enumerate(zip(Us, Vs)):
        r = U.shape[1]
        mask[i, :r], TU[i, :, :r], TV[i, :r] = 1.0, U, V
    wm = w.to(gU.device).view(n, 1) * mask  # (n, R)
    den = wm.sum(0) - wm  # (n, R): weight on each slot without client j
    trained = (mask.sum(0) - mask) > 0  # (n, R)
    wU = wm[:, None, :] * TU  # (n, m, R)
    wV = wm[:, :, None] * TV  # (n, R, n_out)
    U = (wU.sum(0) - wU) / torch.where(trained, den, 1.0)[:, None, :]
    V = (wV.sum(0) - wV) / torch.where(trained, den, 1.0)[:, :, None]
    U = torch.where(trained[:, None, :], U, gU.double()).to(gU.dtype)
    V = torch.where(trained[:, :, None], V, gV.double()).to(gV.dtype)
    return [(U[j], V[j]) for j in range(n)]


def _slice_average(gU: Tensor, gV: Tensor, Us: list[Tensor], Vs: list[Tensor], w: list[float]) -> tuple[Tensor, Tensor]:
    """Slot-wise weighted average over the clients that trained each rank slot."""
    R = gU.shape[1]
    num_U, num_V = torch.zeros_like(gU), torch.zeros_like(gV)
    den = torch.zeros(R, dtype=gU.dtype, device=gU.device)
    for wi, U, V in zip(w, Us, Vs):
        r = U.shape[1]
        num_U[:, :r] += wi * U
        num_V[:r] += wi * V
        den[:r] += wi
    trained = den > 0
    U, V = gU.clone(), gV.clone()
    U[:, trained] = num_U[:, trained] / den[trained]
    V[trained] = num_V[trained] / den[trained, None]
    return U, V


def _lora_scale(update: State, prefix: str) -> torch.Tensor:
    """A client's adapter scale: tanh(c) when it was learned, else its fixed alpha / r."""
    c = update.get(f"{prefix}.scale_param")
    return torch.tanh(c.float()) if c is not None else update[f"{prefix}.scaling"].float()


def merge_adapters(global_state: State, updates: list[State], weights: list[float]) -> State:
    """Federated ReLoRA: fold every client's adapter product into the dense global weights,
    ``W_p += Σ_k w_k s_k B_k A_k`` (exact for any mix of client ranks: merging is linear),
    and FedAvg any other trained tensor the clients sent (``p.base.x`` maps to ``p.x``)."""
    w = normalise_weights(weights)
    new = {k: v.clone() for k, v in global_state.items()}
    prefixes = sorted({k[: -len(".adapter.U")] for u in updates for k in u if k.endswith(".adapter.U")})
    for p in prefixes:
        if f"{p}.weight" not in new:
            raise KeyError(f"global model has no dense weight {p}.weight for adapter {p}")
        delta = sum(wi * _lora_scale(u, p) * (u[f"{p}.adapter.U"].float() @ u[f"{p}.adapter.V"].float())
                    for wi, u in zip(w, updates))
        new[f"{p}.weight"] = new[f"{p}.weight"] + delta.to(new[f"{p}.weight"].dtype)  # type: ignore[union-attr]
    skip = (".adapter.U", ".adapter.V", ".scaling", ".scale_param")
    extra = sorted({k for u in updates for k in u if not k.endswith(skip)})
    for k in extra:
        gk = k.replace(".base.", ".")
        if gk not in new:
            raise KeyError(f"client sent {k!r}, which matches no global tensor")
        if new[gk].is_floating_point():
            new[gk] = sum(wi * u[k].to(new[gk].dtype) for wi, u in zip(w, updates))  # type: ignore[assignment]
    return new
