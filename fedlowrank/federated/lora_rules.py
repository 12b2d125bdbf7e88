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

from fedlowrank.lowrank.spectrum import factored_svd, refactorize_sum

State = dict[str, Tensor]
LORA_RULES = ("fedit", "hetlora", "flexlora", "ffa", "product")
_B, _A = ".adapter.U", ".adapter.V"


def adapter_prefixes(state: State) -> list[str]:
    """Adapted linears ``p`` of a state (those with a ``p.adapter.U``), in key order."""
    return [k[: -len(_B)] for k in state if k.endswith(_B)]


def lora_scale(alpha: float, r: int) -> float:
    """LoRA's scale α/r (Hu et al. 2021)."""
    return float(alpha) / int(r)


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
    """What a client with per-layer ``ranks`` downloads (client convention at its ranks)."""
    out: State = {}
    for p in adapter_prefixes(global_state):
        Bg, Ag = global_state[p + _B].double(), global_state[p + _A].double()
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
        out[p + _B] = B.to(global_state[p + _B].dtype).contiguous()
        out[p + _A] = A.to(global_state[p + _A].dtype).contiguous()
    return out


def _normalise(weights: list[float]) -> list[float]:
    if not weights or any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise ValueError(f"aggregation weights must be non-negative with a positive sum, got {weights}")
    s = float(sum(weights))
    return [w / s for w in weights]


def _norm_weights(Bs: list[Tensor], As: list[Tensor], alpha: float, fallback: list[float]) -> list[float]:
    """HetLoRA's sparsity weights ‖ΔW_k‖_F / Σ_j ‖ΔW_j‖_F (from the factors: ‖BA‖_F = ‖R_B R_Aᵀ‖_F)."""
    norms = []
    for B, A in zip(Bs, As):
        rb = torch.linalg.qr(B.double(), mode="r").R
        ra = torch.linalg.qr(A.double().T, mode="r").R
        norms.append(lora_scale(alpha, B.shape[1]) * float(torch.linalg.matrix_norm(rb @ ra.T)))
    return _normalise(norms) if sum(norms) > 0 else fallback


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
    w = _normalise(weights)
    new: State = {}
    for p in adapter_prefixes(global_state):
        Bg, Ag = global_state[p + _B], global_state[p + _A]
        Bs = [u[p + _B] for u in updates]
        As = [u[p + _A] if rule != "ffa" else Ag[: u[p + _B].shape[1]] for u in updates]
        vs = [(v[p + _B], v[p + _A]) for v in views] if views is not None else None
        B, A = _layer(rule, Bg, Ag, Bs, As, w, alpha, vs)
        new[p + _B], new[p + _A] = B.to(Bg.dtype).contiguous(), A.to(Ag.dtype).contiguous()
    return {k: new.get(k, v) for k, v in global_state.items()}
