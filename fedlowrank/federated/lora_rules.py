"""Heterogeneous-rank LoRA aggregation: the rules that combine adapters of different ranks.

Convention, for every adapter state (the global one, a client's download, a client's reply): each adapted
linear ``p`` holds ``B = p.adapter.U`` (out, r) and ``A = p.adapter.V`` (r, in), and its change of the frozen
weight is ``ΔW = (α/r)·B·A`` with ``r`` the state's own rank there. The scale is never sent: both sides derive it
from the shapes. A client's budget decides ``r``; the global state is kept at the largest rank R.

Rules (client k: rank r_k, scale s_k = α/r_k, aggregation weight p_k, Σ p_k = 1):

* ``fedit`` (FedIT / FlowerTune's FedAvg of adapters): zero-pad √s_k·A_k and √s_k·B_k to R and average each
  separately. Inexact: avg(B)·avg(A) ≠ avg(B·A).
* ``hetlora`` (Cho et al. 2024): the same zero-padding, weighted by ‖ΔW_k‖_F / Σ_j ‖ΔW_j‖_F per layer.
* ``flexlora`` (Bai et al. 2024; FederatedScope's ``FlexLoRA`` branch): ΔW = Σ p_k ΔW_k, its SVD, and client k
  gets the top r_k: ``B = U_r·S_r / s_k``, ``A = V_rᵀ`` (as the reference's ``distribute_weight_fast``).
* ``flora`` (Wang et al. 2024; ATP-1010/FederatedLLM): the replies stacked, [p_1 s_1 B_1, …] · [A_1; …], which is
  Σ p_k ΔW_k exactly, and merged into the base; every round each client trains a fresh adapter on the merged model.
  The merges are kept as thin factors (``p.merged.U`` / ``p.merged.V``), re-factorized exactly once they are wider
  than the layer; the global state and every download are those factors, never a dense out×in matrix.
* ``ffa`` (FFA-LoRA, Sun et al. 2024): A is a frozen random matrix shared by everyone; only B is trained and
  averaged (zero-padded, s_k folded in), so Σ p_k ΔW_k is exact.
* ``product``: G + Σ p_k (ΔW_k − ΔW̃_k), ΔW̃_k what client k downloaded, truncated to rank R (this project's
  exact product rule in the space of changes); downloads split as FlexLoRA's.

Everything is computed from the thin factors (no dense out×in matrix) in float64.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from fedlowrank.lowrank.spectrum import factored_svd

from .aggregation import State, normalise_weights

LORA_RULES = ("fedit", "hetlora", "flexlora", "flora", "ffa", "product")
B_KEY, A_KEY = ".adapter.U", ".adapter.V"  # a layer's B (out, r) and A (r, in) are <layer>.adapter.U / .V
MERGED_U, MERGED_V = ".merged.U", ".merged.V"  # flora: every round's adapters merged so far, ΔW = U·V


def adapter_prefixes(state: State) -> list[str]:
    """Adapted linears ``p`` of a state (those with a ``p.adapter.U``), in key order."""
    return [k[: -len(B_KEY)] for k in state if k.endswith(B_KEY)]


def merged_prefixes(state: State) -> list[str]:
    """Linears ``p`` with merged FLoRA factors (``p.merged.U``), in key order."""
    return [k[: -len(MERGED_U)] for k in state if k.endswith(MERGED_U)]


class FixedScale(float):
    """An α that is the scale itself, whatever the rank (``method.scaling=fixed``; FLoRA's code gives every
    client ``lora_alpha = 2r``: s = 2)."""


def run_alpha(alpha: float, scaling: str) -> float:
    """``method.alpha`` under ``method.scaling``: ``rank`` (s = α/r) or ``fixed`` (s = α)."""
    return FixedScale(alpha) if scaling == "fixed" else float(alpha)


def lora_scale(alpha: float, r: int) -> float:
    """LoRA's scale α/r (Hu et al. 2021); α itself for a :class:`FixedScale`."""
    return float(alpha) if isinstance(alpha, FixedScale) else float(alpha) / int(r)


def delta(B: Tensor, A: Tensor, alpha: float) -> Tensor:
    """ΔW = (α/r)·B·A (out, in), float64: for tests and evaluation, never inside aggregation."""
    return lora_scale(alpha, B.shape[1]) * (B.double() @ A.double())


def _pad_cols(t: Tensor, R: int) -> Tensor:
    return torch.cat([t, t.new_zeros(t.shape[0], R - t.shape[1])], dim=1) if t.shape[1] < R else t


def _pad_rows(t: Tensor, R: int) -> Tensor:
    return torch.cat([t, t.new_zeros(R - t.shape[0], t.shape[1])], dim=0) if t.shape[0] < R else t


def _svd_top(lefts: list[Tensor], rights: list[Tensor], weights: list[float], r: int) -> tuple[Tensor, Tensor, Tensor]:
    """(P, S, Qh) of the best rank-r approximation of Σ w_k L_k R_k, from the thin factors; zero-padded to r."""
    L = torch.cat([w * x.double() for w, x in zip(weights, lefts)], dim=1)
    Rt = torch.cat([x.double() for x in rights], dim=0)
    P, S, Qh = factored_svd(L, Rt)
    k = min(r, S.numel())
    P, S, Qh = P[:, :k], S[:k], Qh[:k]
    if k < r:
        P, S, Qh = _pad_cols(P, r), torch.cat([S, S.new_zeros(r - k)]), _pad_rows(Qh, r)
    return P, S, Qh


def view(rule: str, global_state: State, ranks: dict[str, int], alpha: float) -> State:
    """What a client with per-layer ``ranks`` downloads (client convention at its ranks; ``flora``: the merged
    factors, the same for every client, which then trains a fresh adapter of its rank)."""
    if rule == "flora":
        return {k: v.clone() for k, v in global_state.items()}
    out: State = {}
    for p in adapter_prefixes(global_state):
        Bg, Ag = global_state[p + B_KEY].double(), global_state[p + A_KEY].double()
        R, r = Bg.shape[1], min(ranks[p], Bg.shape[1])
        sR, sr = lora_scale(alpha, R), lora_scale(alpha, r)
        if rule in ("fedit", "hetlora"):  # first r slots of the √s-balanced global factors
            B, A = Bg[:, :r] * math.sqrt(sR / sr), Ag[:r] * math.sqrt(sR / sr)
        elif rule == "ffa":  # A is the shared frozen one: the whole scale goes into B
            B, A = Bg[:, :r] * (sR / sr), Ag[:r]
        elif rule in ("flexlora", "product"):  # FlexLoRA's split: B = U_r S_r / s_r, A = V_rᵀ (A never all zero,
            P, S, Qh = _svd_top([Bg], [Ag], [sR], r)  # so an adapter can train even where ΔW_g is still 0)
            B, A = P * S / sr, Qh
        else:
            raise ValueError(f"unknown LoRA rule {rule!r}; choose from {LORA_RULES}")
        out[p + B_KEY] = B.to(global_state[p + B_KEY].dtype).contiguous()
        out[p + A_KEY] = A.to(global_state[p + A_KEY].dtype).contiguous()
    return out


def _product_norm(L: Tensor, R: Tensor) -> float:
    """‖L·R‖_F from the thin factors L (m, k), R (k, n): ‖R_L·R_Rᵀ‖_F with R_L, R_R their QR triangles."""
    rl = torch.linalg.qr(L.double(), mode="r").R
    rr = torch.linalg.qr(R.double().T, mode="r").R
    return float(torch.linalg.matrix_norm(rl @ rr.T))


def _norm_weights(Bs: list[Tensor], As: list[Tensor], alpha: float, fallback: list[float]) -> list[float]:
    """HetLoRA's sparsity weights ‖ΔW_k‖_F / Σ_j ‖ΔW_j‖_F."""
    norms = [lora_scale(alpha, B.shape[1]) * _product_norm(B, A) for B, A in zip(Bs, As)]
    return normalise_weights(norms) if sum(norms) > 0 else fallback


def _layer(rule: str, Bg: Tensor, Ag: Tensor, Bs: list[Tensor], As: list[Tensor], w: list[float], alpha: float,
           views: list[tuple[Tensor, Tensor]] | None) -> tuple[Tensor, Tensor]:
    """The new global (B, A) of one layer at the global rank R (client convention)."""
    R = Bg.shape[1]
    sR = lora_scale(alpha, R)
    s = [lora_scale(alpha, B.shape[1]) for B in Bs]
    if rule in ("fedit", "hetlora"):
        if rule == "hetlora":
            w = _norm_weights(Bs, As, alpha, w)
        B = sum(wk * math.sqrt(sk) * _pad_cols(Bk.double(), R) for wk, sk, Bk in zip(w, s, Bs))
        A = sum(wk * math.sqrt(sk) * _pad_rows(Ak.double(), R) for wk, sk, Ak in zip(w, s, As))
        return B / math.sqrt(sR), A / math.sqrt(sR)  # type: ignore[operator]
    if rule == "ffa":
        B = sum(wk * sk * _pad_cols(Bk.double(), R) for wk, sk, Bk in zip(w, s, Bs))
        return B / sR, Ag.double()  # type: ignore[operator]
    if rule == "flexlora":
        P, S, Qh = _svd_top(Bs, As, [wk * sk for wk, sk in zip(w, s)], R)
        return P * S / sR, Qh
    if rule == "product":
        if views is None:
            raise ValueError("the product rule needs what each client downloaded (views)")
        sv = [lora_scale(alpha, vB.shape[1]) for vB, _ in views]
        lefts = [Bg, *Bs, *(vB for vB, _ in views)]
        rights = [Ag, *As, *(vA for _, vA in views)]
        coef = [sR, *(wk * sk for wk, sk in zip(w, s)), *(-wk * sk for wk, sk in zip(w, sv))]
        P, S, Qh = _svd_top(lefts, rights, coef, R)
        return P * S / sR, Qh
    raise ValueError(f"unknown LoRA rule {rule!r}; choose from {LORA_RULES}")


def aggregate(rule: str, global_state: State, updates: list[State], weights: list[float], alpha: float,
              views: list[State] | None = None) -> State:
    """The new global adapter state from validated replies (``ffa`` replies hold B only: A is the global one)."""
    if not updates:
        return {k: v.clone() for k, v in global_state.items()}
    w = normalise_weights(weights)
    if rule == "flora":
        return merge_stacked(global_state, updates, w, alpha)
    new: State = {}
    for p in adapter_prefixes(global_state):
        Bg, Ag = global_state[p + B_KEY], global_state[p + A_KEY]
        Bs = [u[p + B_KEY] for u in updates]
        As = [u[p + A_KEY] if rule != "ffa" else Ag[: u[p + B_KEY].shape[1]] for u in updates]
        vs = [(v[p + B_KEY], v[p + A_KEY]) for v in views] if views is not None else None
        B, A = _layer(rule, Bg, Ag, Bs, As, w, alpha, vs)
        new[p + B_KEY], new[p + A_KEY] = B.to(Bg.dtype).contiguous(), A.to(Ag.dtype).contiguous()
    return {k: new.get(k, v) for k, v in global_state.items()}


def merge_stacked(global_state: State, updates: list[State], w: list[float], alpha: float) -> State:
    """FLoRA: the merged factors with every reply's p_k·s_k·B_k and A_k stacked on (exactly Σ p_k ΔW_k more);
    once wider than min(out, in) they are re-factorized from their thin SVD, dropping only zero directions."""
    new: State = {}
    for p in merged_prefixes(global_state):
        U, V = global_state[p + MERGED_U], global_state[p + MERGED_V]
        Us = [U.double(), *(wk * lora_scale(alpha, u[p + B_KEY].shape[1]) * u[p + B_KEY].double()
                            for wk, u in zip(w, updates))]
        Vs = [V.double(), *(u[p + A_KEY].double() for u in updates)]
        U2, V2 = torch.cat(Us, dim=1), torch.cat(Vs, dim=0)
        if U2.shape[1] > min(U2.shape[0], V2.shape[1]):
            P, S, Qh = factored_svd(U2, V2)
            keep = max(1, int((S > S[0] * 1e-12).sum())) if S.numel() and S[0] > 0 else 1
            U2, V2 = P[:, :keep] * S[:keep], Qh[:keep]
        new[p + MERGED_U], new[p + MERGED_V] = U2.to(U.dtype).contiguous(), V2.to(V.dtype).contiguous()
    return {k: new.get(k, v) for k, v in global_state.items()}


def merged_delta(state: State, p: str) -> Tensor:
    """FLoRA's merged ΔW of layer ``p`` (out, in), float64: for tests and export."""
    return state[p + MERGED_U].double() @ state[p + MERGED_V].double()


def change_norm(update: State, view: State, p: str, alpha: float) -> float:
    """‖ΔW(update) − ΔW(view)‖_F of layer ``p`` from the thin factors (a view without that adapter counts as 0;
    an update without A, as ffa's, uses the view's)."""
    B, A = update[p + B_KEY].double(), (update.get(p + A_KEY, view.get(p + A_KEY)))
    lefts, rights = [lora_scale(alpha, B.shape[1]) * B], [A.double()]  # type: ignore[union-attr]
    if p + B_KEY in view:
        vB = view[p + B_KEY].double()
        lefts.append(-lora_scale(alpha, vB.shape[1]) * vB)
        rights.append(view[p + A_KEY].double())
    return _product_norm(torch.cat(lefts, dim=1), torch.cat(rights, dim=0))


def _toward(view: State, update: State, c: float) -> State:
    """The update with its change scaled by ``c``: each factor the view holds at the same shape moves c of the way
    from the view's value; a B the view lacks (fresh adapters) is scaled by c; anything else is kept."""
    out = dict(update)
    for k, u in update.items():
        v = view.get(k)
        if v is not None and v.shape == u.shape:
            out[k] = (v.double() + c * (u.double() - v.double())).to(u.dtype)
        elif k.endswith(B_KEY):
            out[k] = (c * u.double()).to(u.dtype)
    return out


def clip_auto(pairs: list[tuple[State, State]], factor: float, alpha: float, min_contributors: int = 3
              ) -> tuple[list[State], list[float | None], list[int]]:
    """``fed.clip_auto`` for adapters, in the space of ΔW: per layer, each client's ‖ΔW(update) − ΔW(view)‖_F
    against the lower median of the changes of the round's clients of the same or a smaller rank there (honest
    changes grow as the rank shrinks: the scale α/r grows), or their smallest when fewer than
    ``min_contributors`` clients are in that pool. A client above ``factor`` x on some layer has its change scaled
    down (:func:`_toward`, the scale found by bisection on the ΔW norms, exact where ΔW is linear in the change:
    ``ffa`` and ``flora``) until it is at ``factor`` x. Returns what
    :func:`fedlowrank.federated.clipping.clip_auto` returns (no slot caps here)."""
    prefixes = adapter_prefixes(pairs[0][1])
    norms = [{p: change_norm(u, v, p, alpha) for p in prefixes} for v, u in pairs]
    ranks = [{p: u[p + B_KEY].shape[1] for p in prefixes} for _, u in pairs]

    def ref(k: int, p: str) -> float:
        pool = sorted(n[p] for n, r in zip(norms, ranks) if r[p] <= ranks[k][p])
        return pool[(len(pool) - 1) // 2] if len(pool) >= min_contributors else pool[0]

    refs = [{p: ref(k, p) for p in prefixes} for k in range(len(pairs))]
    updates, scaled = [], []
    for (v, u), n, rf in zip(pairs, norms, refs):
        def excess(x: State) -> float:
            return max((change_norm(x, v, p, alpha) / rf[p] if rf[p] > 0 else 0.0) for p in prefixes)

        x = max((n[p] / rf[p] if rf[p] > 0 else 0.0) for p in prefixes) if prefixes else 0.0
        if x <= factor:
            updates.append(u)
            scaled.append(None)
            continue
        lo, hi = 0.0, 1.0
        for _ in range(40):  # the largest c whose scaled change is within the bound
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if excess(_toward(v, u, mid)) <= factor else (lo, mid)
        updates.append(_toward(v, u, lo))
        scaled.append(x)
    return updates, scaled, [0] * len(pairs)
