"""Dense vs factorized Linear: fwd+bwd time ratio against the FLOP ratio, and the cost of the
spectrum from thin factors vs a dense SVD. Prints JSON.

    python benchmarks/bench_lowrank_layer.py [--device cuda] [--dim 1024] [--tokens 4096]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import emit, timeit  # noqa: E402

from fedlowrank.lowrank import LowRankLinear, count_flops, factored_svdvals  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.0625, 0.125, 0.25, 0.5])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--kernel", action="store_true", help="use the Triton kernel for the factorized layer")
    args = ap.parse_args()
    dev, dt = torch.device(args.device), getattr(torch, args.dtype)
    cuda = dev.type == "cuda"
    d, T = args.dim, args.tokens
    x = torch.randn(T, d, device=dev, dtype=dt, requires_grad=True)
    dense = nn.Linear(d, 4 * d, device=dev, dtype=dt)

    def step(layer):
        def f():
            layer.zero_grad(set_to_none=True)
            layer(x).float().square().mean().backward()
        return f

    t_dense = timeit(step(dense), cuda=cuda)
    f_dense = count_flops(dense, x, backward=True)
    rows = []
    for ratio in args.ratios:
        r = max(1, int(ratio * d))
        low = LowRankLinear(d, 4 * d, r, device=dev, dtype=dt)
        if args.kernel:
            low.use_kernel = True
        t_low = timeit(step(low), cuda=cuda)
        f_low = count_flops(low, x, backward=True)
        # spectrum: thin factors (QR + r×r SVD) vs dense SVD of the m×n product
        t_thin = timeit(lambda: factored_svdvals(low.U, low.V), warmup=1, iters=5, cuda=cuda)
        t_full = timeit(lambda: torch.linalg.svdvals((low.U @ low.V).float()), warmup=1, iters=3, cuda=cuda)
        rows.append({
            "rank": r, "ratio": ratio, "dense_ms": 1e3 * t_dense, "lowrank_ms": 1e3 * t_low,
            "time_ratio": t_low / t_dense, "flop_ratio": f_low / f_dense,
            "speedup": t_dense / t_low, "flop_speedup": f_dense / f_low,
            "spectrum_thin_ms": 1e3 * t_thin, "spectrum_dense_ms": 1e3 * t_full,
            "spectrum_speedup": t_full / t_thin,
        })
    emit("lowrank_layer", {"device": str(dev), "dtype": args.dtype, "in": d, "out": 4 * d, "tokens": T,
                           "kernel": args.kernel, "results": rows})


if __name__ == "__main__":
    main()
