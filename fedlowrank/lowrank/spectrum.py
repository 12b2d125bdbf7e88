"""Spectral utilities on thin factors: never form the dense m×n product.

For ``W = A @ B`` with ``A: (m, r)`` and ``B: (r, n)``:
``A = Q_a R_a`` and ``Bᵀ = Q_b R_b`` (reduced QR), so ``W = Q_a (R_a R_bᵀ) Q_bᵀ``;
an SVD of the small ``r×r`` core gives the SVD of W in O((m+n) r² + r³).
"""
from __future__ import annotations

import torch
from torch import Tensor


def _work(t: Tensor) -> Tensor:
    """Detached copy in a precision fit for QR/SVD: float64 stays, everything else float32."""
    return t.detach().double() if t.dtype == torch.float64 else t.detach().float()


def factored_svd(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of ``A @ B`` from the factors.

    Args:
        A: (m, r) left factor.  B: (r, n) right factor.
    Returns:
        ``(P, S, Qh)`` with ``A @ B == P @ diag(S) @ Qh``; P: (m, k), S: (k,), Qh: (k, n),
        ``k = min(m, n, r)``, S sorted descending.
    """
    if A.ndim != 2 or B.ndim != 2 or A.shape[1] != B.shape[0]:
        raise ValueError(f"factored_svd needs (m,r) @ (r,n), got {tuple(A.shape)} @ {tuple(B.shape)}")
    dtype = A.dtype
    A32, B32 = _work(A), _work(B)
    Qa, Ra = torch.linalg.qr(A32, mode="reduced")  # (m, ka), (ka, r)
    Qb, Rb = torch.linalg.qr(B32.T, mode="reduced")  # (n, kb), (kb, r)
    core = Ra @ Rb.T  # (ka, kb)
    P, S, Qh = torch.linalg.svd(core, full_matrices=False)
    return (Qa @ P).to(dtype), S.to(dtype), (Qh @ Qb.T).to(dtype)


def factored_svdvals(A: Tensor, B: Tensor) -> Tensor:
    """Singular values of ``A @ B`` (descending) from the thin factors."""
    A32, B32 = _work(A), _work(B)
    Ra = torch.linalg.qr(A32, mode="r").R
    Rb = torch.linalg.qr(B32.T, mode="r").R
    return torch.linalg.svdvals(Ra @ Rb.T).to(A.dtype)


def balanced_factors(P: Tensor, S: Tensor, Qh: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Split a truncated SVD into balanced factors ``U = P√S`` (m, rank), ``V = √S Qh`` (rank, n).

    If ``rank`` exceeds the number of singular values the extra slots are zero-padded.
    """
    k = min(rank, S.numel())
    root = S[:k].clamp_min(0).sqrt()
    U = P[:, :k] * root
    V = root[:, None] * Qh[:k]
    if rank > k:
        U = torch.cat([U, U.new_zeros(U.shape[0], rank - k)], dim=1)
        V = torch.cat([V, V.new_zeros(rank - k, V.shape[1])], dim=0)
    return U, V


def truncate_factors(A: Tensor, B: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-``rank`` approximation of ``A @ B`` (Eckart–Young) as balanced factors, from the thin factors.
    A: (m, r), B: (r, n) -> U (m, rank), V (rank, n)."""
    P, S, Qh = factored_svd(A, B)
    return balanced_factors(P, S, Qh, rank)


def refactorize_sum(
    lefts: list[Tensor], rights: list[Tensor], weights: list[float], rank: int
) -> tuple[Tensor, Tensor]:
    """Best rank-``rank`` factors of ``Σ_k w_k U_k V_k`` without any dense matrix.

    ``Σ w_k U_k V_k = [w_1 U_1, …, w_K U_K] @ [V_1; …; V_K]`` is itself a product of thin
    factors of inner size ``Σ r_k``; its factored SVD is truncated to ``rank``.
    Args: lefts: K tensors (m, r_k); rights: K tensors (r_k, n); weights: K floats.
    Returns: U (m, rank), V (rank, n).
    """
    if not (len(lefts) == len(rights) == len(weights)) or not lefts:
        raise ValueError("refactorize_sum needs equally many (>0) lefts, rights and weights")
    A = torch.cat([w * U for w, U in zip(weights, lefts)], dim=1)
    B = torch.cat(list(rights), dim=0)
    return truncate_factors(A, B, rank)


def explained_variance_ratios(S: Tensor, n_total: int | None = None) -> Tensor:
    """InRank's explained ratio for every k = 0..n: ``1 - var(s_tail(k)) / var(s)``, where
    ``s_tail(k)`` is s with its k leading values set to zero (the paper / reference code).
    ``s`` is padded with zeros to ``n_total`` values: the reference takes the singular values of
    the dense product, min(m, n) of them, most ~0 beyond the factor rank. Returns (n+1,) float64."""
    s = S.detach().double().cpu().flatten()
    n = max(int(n_total or 0), s.numel())
    s = torch.cat([s, s.new_zeros(n - s.numel())])
    if n < 2:
        return torch.ones(n + 1, dtype=torch.float64)
    # tail sums over i >= k, for k = 0..n
    t1 = torch.cat([s.flip(0).cumsum(0).flip(0), s.new_zeros(1)])
    t2 = torch.cat([s.square().flip(0).cumsum(0).flip(0), s.new_zeros(1)])
    var_tail = (t2 - t1.square() / n) / (n - 1)
    var_all = var_tail[0]
    if var_all <= 0:
        return torch.ones(n + 1, dtype=torch.float64)
    return 1.0 - var_tail / var_all


def explained_variance_rank(S: Tensor, threshold: float, n_total: int | None = None) -> int:
    """Smallest k ≥ 1 whose explained ratio ``1 - var(tail)/var(s)`` exceeds ``threshold``
    (InRank's rule); ``len(S)`` when none does."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"explained-ratio threshold must be in (0, 1], got {threshold}")
    ratios = explained_variance_ratios(S, n_total)[1: S.numel() + 1]
    hit = torch.nonzero(ratios > threshold)
    return int(hit[0].item()) + 1 if hit.numel() else max(1, S.numel())


def explained_energy_ratios(S: Tensor) -> Tensor:
    """``Σ_{i<k} s_i² / Σ s_i²`` for every k = 0..n, (n+1,) float64; all zeros when S is all zero."""
    energy = S.detach().double().cpu().flatten().pow(2)
    return torch.cat([energy.new_zeros(1), torch.cumsum(energy, 0)]) / energy.sum().clamp_min(1e-300)


def explained_rank(S: Tensor, threshold: float) -> int:
    """Smallest k with ``Σ_{i<k} s_i² / Σ s_i² ≥ threshold`` (energy rule)."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"explained-ratio threshold must be in (0, 1], got {threshold}")
    if not bool((S != 0).any()):
        return 1
    cum = explained_energy_ratios(S)[1:]
    k = int(torch.searchsorted(cum, torch.tensor(threshold, dtype=cum.dtype) - 1e-12).item()) + 1
    return min(k, S.numel())
