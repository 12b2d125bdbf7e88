"""Fused Triton low-rank linear vs the torch reference (two GEMMs) vs a dense Linear, on CUDA.

Reports ms, achieved TFLOP/s and GB/s against the memory floor (read x, write y), for fwd
and fwd+bwd, bf16, GPT-2-sized shapes. Prints JSON.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import emit, timeit  # noqa: E402

from fedlowrank.kernels import lowrank_linear, lowrank_linear_ref  # noqa: E402


def main() -> None:
    if not torch.cuda.is_available():
        emit("kernels", {"skipped": "needs CUDA"})
        return
    dev, dt = "cuda", torch.bfloat16
    shapes = [(8192, 768, 3072, r) for r in (32, 64, 128, 256)] + [(16384, 1024, 4096, r) for r in (64, 128, 256)]
    rows = []
    for M, K, N, R in shapes:
        x = torch.randn(M, K, device=dev, dtype=dt)
        U = torch.randn(N, R, device=dev, dtype=dt) / R**0.5
        V = torch.randn(R, K, device=dev, dtype=dt) / K**0.5
        W = torch.randn(N, K, device=dev, dtype=dt) / K**0.5
        b = torch.randn(N, device=dev, dtype=dt)
        y_ref = lowrank_linear_ref(x.double(), U.double(), V.double(), b.double())
        rel = ((lowrank_linear(x, U, V, b).double() - y_ref).norm() / y_ref.norm()).item()
        t_fused = timeit(lambda: lowrank_linear(x, U, V, b), warmup=5, iters=50, cuda=True)
        t_ref = timeit(lambda: lowrank_linear_ref(x, U, V, b), warmup=5, iters=50, cuda=True)
        t_dense = timeit(lambda: F.linear(x, W, b), warmup=5, iters=50, cuda=True)
        xg, Ug, Vg, bg = (t.clone().requires_grad_() for t in (x, U, V, b))
        gy = torch.randn(M, N, device=dev, dtype=dt)
        Wg = W.clone().requires_grad_()
        tb_fused = timeit(lambda: lowrank_linear(xg, Ug, Vg, bg).backward(gy), warmup=3, iters=20, cuda=True)
        tb_ref = timeit(lambda: lowrank_linear_ref(xg, Ug, Vg, bg).backward(gy), warmup=3, iters=20, cuda=True)
        tb_dense = timeit(lambda: F.linear(xg, Wg, bg).backward(gy), warmup=3, iters=20, cuda=True)
        flops = 2 * M * R * (K + N)
        floor_bytes = 2 * (M * K + M * N + R * (K + N))
        rows.append({
            "M": M, "K": K, "N": N, "R": R, "rel_err_vs_fp64": rel,
            "fwd_ms": {"fused": 1e3 * t_fused, "torch_lowrank": 1e3 * t_ref, "dense": 1e3 * t_dense},
            "fwd_bwd_ms": {"fused": 1e3 * tb_fused, "torch_lowrank": 1e3 * tb_ref, "dense": 1e3 * tb_dense},
            "fused_vs_torch_fwd_speedup": t_ref / t_fused, "fused_vs_dense_fwd_speedup": t_dense / t_fused,
            "fused_vs_torch_fwd_bwd_speedup": tb_ref / tb_fused,
            "fused_fwd_tflops": flops / t_fused / 1e12, "fused_fwd_GBps": floor_bytes / t_fused / 1e9,
            "torch_fwd_GBps": floor_bytes / t_ref / 1e9,
        })
    emit("kernels", {"device": torch.cuda.get_device_name(), "dtype": "bfloat16", "results": rows})


if __name__ == "__main__":
    main()
