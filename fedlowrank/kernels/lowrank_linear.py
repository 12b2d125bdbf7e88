"""Fused low-rank linear ``y = (x Vᵀ) Uᵀ + b`` in Triton, beside its torch reference.

Forward: one kernel per block of BLOCK_M rows computes ``h = x_blk Vᵀ`` (BLOCK_M × r, kept in
registers, never written to memory) and then every output tile ``h Uᵀ + b``.
Backward: ``h`` is recomputed and the four small GEMMs (dU = dyᵀh, g = dy U, dV = gᵀx,
dx = g V) go to cuBLAS — they are plain GEMMs with nothing to fuse.

On CPU the kernel runs under ``TRITON_INTERPRET=1`` (tests); loads are cast to fp32 there,
since the interpreter mishandles bf16.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # pragma: no cover - triton missing
    HAVE_TRITON = False

MAX_FUSED_RANK = 256
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def lowrank_linear_ref(x: Tensor, U: Tensor, V: Tensor, bias: Tensor | None = None) -> Tensor:
    """Reference: x (..., in), V (r, in), U (out, r) -> (..., out)."""
    return F.linear(F.linear(x, V), U, bias)


if HAVE_TRITON:

    @triton.jit
    def _lowrank_fwd_kernel(
        X, VT, UT, BIAS, Y, M, K, N, R,
        sxm, sxk, svk, svr, sur, sun, sym, syn,
        HAS_BIAS: tl.constexpr, CAST_FP32: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
        TILES_PER_PROG: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rr = tl.arange(0, BLOCK_R)
        h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):  # h = x_blk @ Vᵀ   (BLOCK_M, BLOCK_R)
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(X + rm[:, None] * sxm + rk[None, :] * sxk, mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
            v = tl.load(VT + rk[:, None] * svk + rr[None, :] * svr, mask=(rk[:, None] < K) & (rr[None, :] < R), other=0.0)
            if CAST_FP32:
                x = x.to(tl.float32)
                v = v.to(tl.float32)
            if IEEE:
                h += tl.dot(x, v, input_precision="ieee")
            else:
                h += tl.dot(x, v)
        if CAST_FP32:
            hq = h
        else:
            hq = h.to(X.dtype.element_ty)  # round like the unfused path (bf16 intermediate)
        for j in range(TILES_PER_PROG):  # y tile = h @ Uᵀ + b
            rn = (pid_n * TILES_PER_PROG + j) * BLOCK_N + tl.arange(0, BLOCK_N)
            u = tl.load(UT + rr[:, None] * sur + rn[None, :] * sun, mask=(rr[:, None] < R) & (rn[None, :] < N), other=0.0)
            if CAST_FP32:
                u = u.to(tl.float32)
            if IEEE:
                y = tl.dot(hq, u, input_precision="ieee")
            else:
                y = tl.dot(hq, u)
            if HAS_BIAS:
                y += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
            tl.store(Y + rm[:, None] * sym + rn[None, :] * syn, y.to(Y.dtype.element_ty),
                     mask=(rm[:, None] < M) & (rn[None, :] < N))


def _blocks(M: int, K: int, N: int, R: int, cfg: dict | None = None, elem_bytes: int = 2) -> tuple[int, int, int, int, int, int, int, int]:
    """Tile sizes: (BLOCK_M, BLOCK_K, BLOCK_R, BLOCK_N, n_splits, tiles_per_prog, num_warps, num_stages)."""
    cfg = cfg or {}
    BLOCK_R = max(16, triton.next_power_of_2(R))
    # defaults from benchmarks/sweep_kernel.py on an H100 (bf16, GPT-2 shapes)
    BLOCK_M = cfg.get("BLOCK_M", 64 if BLOCK_R <= 128 else 32)
    BLOCK_K = cfg.get("BLOCK_K", 64 if not INTERPRET else 32)
    BLOCK_N = cfg.get("BLOCK_N", (128 if N >= 4096 else 64) if not INTERPRET else 32)
    n_tiles = triton.cdiv(N, BLOCK_N)
    m_progs = triton.cdiv(M, BLOCK_M)
    # enough programs to fill the GPU; each extra N split recomputes h (cheap: r ≪ N)
    splits = 1 if INTERPRET else cfg.get("splits", 4 if N > K and m_progs < 200 else 1)
    splits = min(splits, n_tiles)
    warps = cfg.get("num_warps", 4 if BLOCK_R <= 64 else 8)
    stages = cfg.get("num_stages", 3 if BLOCK_R * elem_bytes <= 256 else 2)  # wide fp32 tiles: less smem
    return BLOCK_M, BLOCK_K, BLOCK_R, BLOCK_N, splits, triton.cdiv(n_tiles, splits), warps, stages


def lowrank_forward_triton(x2: Tensor, U: Tensor, V: Tensor, bias: Tensor | None, cfg: dict | None = None) -> Tensor:
    """x2 (M, K), U (N, r), V (r, K) -> (M, N) with the fused kernel (``cfg`` overrides tile sizes)."""
    M, K = x2.shape
    N, R = U.shape
    y = torch.empty(M, N, device=x2.device, dtype=x2.dtype)
    BM, BK, BR, BN, splits, tiles, warps, stages = _blocks(M, K, N, R, cfg, x2.element_size())
    U, V = U.to(x2.dtype), V.to(x2.dtype)
    b = bias.to(x2.dtype) if bias is not None else y  # dummy pointer when no bias
    ieee = x2.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32

    def launch(BM: int, BK: int, BN: int, splits: int, tiles: int, warps: int, stages: int) -> None:
        _lowrank_fwd_kernel[(triton.cdiv(M, BM), splits)](
            x2, V, U, b, y, M, K, N, R,
            x2.stride(0), x2.stride(1), V.stride(1), V.stride(0), U.stride(1), U.stride(0), y.stride(0), y.stride(1),
            HAS_BIAS=bias is not None, CAST_FP32=INTERPRET, IEEE=ieee and not INTERPRET,
            BLOCK_M=BM, BLOCK_K=BK, BLOCK_R=BR, BLOCK_N=BN, TILES_PER_PROG=tiles,
            num_warps=warps, num_stages=stages,
        )

    try:
        launch(BM, BK, BN, splits, tiles, warps, stages)
    except Exception as e:  # triton's OutOfResources (shared memory) on unusual shapes: smallest tiles
        if "resource" not in type(e).__name__.lower() and "resource" not in str(e).lower():
            raise
        BN2 = 32
        launch(min(BM, 32), 32, BN2, 1, triton.cdiv(N, BN2), 4, 1)
    return y


class _LowRankLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, U: Tensor, V: Tensor, bias: Tensor | None) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        y = lowrank_forward_triton(x2, U, V, bias)
        ctx.save_for_backward(x2, U, V)
        ctx.has_bias, ctx.shape = bias is not None, shape
        return y.view(*shape[:-1], U.shape[0])

    @staticmethod
    def backward(ctx, dy: Tensor):
        x2, U, V = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1]).to(x2.dtype)
        Uc, Vc = U.to(x2.dtype), V.to(x2.dtype)
        h = x2 @ Vc.t()  # (M, r) recomputed
        g = dy2 @ Uc  # (M, r)
        dU = (dy2.t() @ h).to(U.dtype)  # (N, r)
        dV = (g.t() @ x2).to(V.dtype)  # (r, K)
        dx = (g @ Vc).view(ctx.shape)
        db = dy2.sum(0).to(U.dtype) if ctx.has_bias else None
        return dx, dU, dV, db


def kernel_available(x: Tensor, rank: int) -> bool:
    return HAVE_TRITON and rank <= MAX_FUSED_RANK and (x.is_cuda or (INTERPRET and x.device.type == "cpu"))


def lowrank_linear(x: Tensor, U: Tensor, V: Tensor, bias: Tensor | None = None) -> Tensor:
    """Fused Triton path where available (CUDA, or the interpreter), else the torch reference.
    Under autocast the inputs are cast to the autocast dtype first, as ``F.linear`` would."""
    if not kernel_available(x, U.shape[1]):
        return lowrank_linear_ref(x, U, V, bias)
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        dt = torch.get_autocast_dtype("cuda")
        x, U, V = x.to(dt), U.to(dt), V.to(dt)
        bias = bias.to(dt) if bias is not None else None
        with torch.autocast("cuda", enabled=False):
            return _LowRankLinearFn.apply(x, U, V, bias)
    return _LowRankLinearFn.apply(x, U, V, bias)
