"""Factorized vs dense Linear, layer alone: forward and forward+backward time ratios against the
FLOP ratio, plus a torch-profiler summary of where the time goes. Prints JSON.

Timing: the same input every call, warm-up, medians of CUDA-event (GPU) or perf_counter (CPU)
times; the timed region is exactly the layer's forward (and ``autograd.grad`` with a fixed output
gradient): no loss, cast, reduction or zero_grad inside it. Targets (issue: low rank that wins):
time ratio <= 0.6 at r = d/4 and <= 0.35 at r = d/8, bf16, >= 8192 tokens.

    python benchmarks/bench_lowrank_layer.py                      # GPU defaults: d in 1024 2048 4096
    python benchmarks/bench_lowrank_layer.py --dims 256 --tokens 2048 --dtype float32   # quick CPU look
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import emit, environment, timeit  # noqa: E402

from fedlowrank.lowrank import LowRankLinear, count_flops, factored_svdvals  # noqa: E402

TARGETS = {0.25: 0.6, 0.125: 0.35}  # rank ratio -> max fwd+bwd time ratio


def fwd_bwd(layer: nn.Module, x: torch.Tensor, gy: torch.Tensor):
    params = [p for p in layer.parameters() if p.requires_grad]

    def run():
        torch.autograd.grad(layer(x), [x, *params], gy)
    return run


def fwd(layer: nn.Module, x: torch.Tensor):
    def run():
        with torch.no_grad():
            layer(x)
    return run


def profile_summary(fn, cuda: bool, steps: int = 5, top: int = 8) -> list[dict]:
    """Top ops by self time over ``steps`` calls (device time on CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    fn()
    with profile(activities=acts) as prof:
        for _ in range(steps):
            fn()
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1.0
    return [{"op": e.key, "calls": e.count // steps, "ms_per_step": getattr(e, key) / 1e3 / steps,
             "share": getattr(e, key) / total} for e in events[:top] if getattr(e, key) > 0]


def main() -> None:
    gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if gpu else "cpu")
    ap.add_argument("--dims", type=int, nargs="+", default=[1024, 2048, 4096] if gpu else [256, 512])
    ap.add_argument("--tokens", type=int, default=8192 if gpu else 2048)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.125, 0.0625])
    ap.add_argument("--shapes", nargs="+", default=["square", "mlp"], help="square: d->d, mlp: d->4d")
    ap.add_argument("--dtype", default="bfloat16" if gpu else "float32", help="bf16 GEMMs on CPU are very slow")
    ap.add_argument("--iters", type=int, default=50 if gpu else 10)
    ap.add_argument("--kernel", action="store_true", help="also time the Triton fused kernel path")
    ap.add_argument("--no-profile", action="store_true")
    args = ap.parse_args()
    dev, dt = torch.device(args.device), getattr(torch, args.dtype)
    cuda = dev.type == "cuda"
    T = args.tokens
    rows, profiles, spectra = [], {}, []
    for d in args.dims:
        for shape in args.shapes:
            n_out = d if shape == "square" else 4 * d
            torch.manual_seed(0)
            x = torch.randn(T, d, device=dev, dtype=dt, requires_grad=True)  # same input for every call
            gy = torch.randn(T, n_out, device=dev, dtype=dt)  # fixed output gradient
            dense = nn.Linear(d, n_out, device=dev, dtype=dt)
            t_dense = timeit(fwd_bwd(dense, x, gy), warmup=5, iters=args.iters, cuda=cuda)
            tf_dense = timeit(fwd(dense, x), warmup=5, iters=args.iters, cuda=cuda)
            f_dense = count_flops(dense, x, backward=True)
            for ratio in args.ratios:
                r = max(1, int(ratio * d))
                low = LowRankLinear(d, n_out, r, device=dev, dtype=dt, init="random")
                variants = {"torch": low}
                if args.kernel and cuda:
                    k = LowRankLinear(d, n_out, r, device=dev, dtype=dt, init="random")
                    k.use_kernel = True
                    variants["kernel"] = k
                for name, layer in variants.items():
                    t_low = timeit(fwd_bwd(layer, x, gy), warmup=5, iters=args.iters, cuda=cuda)
                    tf_low = timeit(fwd(layer, x), warmup=5, iters=args.iters, cuda=cuda)
                    f_low = count_flops(low, x, backward=True)
                    row = {"d": d, "out": n_out, "shape": shape, "rank": r, "ratio": ratio, "path": name,
                           "dense_ms": 1e3 * t_dense, "lowrank_ms": 1e3 * t_low, "time_ratio": t_low / t_dense,
                           "fwd_dense_ms": 1e3 * tf_dense, "fwd_lowrank_ms": 1e3 * tf_low,
                           "fwd_time_ratio": tf_low / tf_dense, "flop_ratio": f_low / f_dense,
                           "lowrank_tflops": f_low / t_low / 1e12, "dense_tflops": f_dense / t_dense / 1e12}
                    if ratio in TARGETS:
                        row["target"] = TARGETS[ratio]
                        row["target_met"] = row["time_ratio"] <= TARGETS[ratio]
                    rows.append(row)
                if shape == "mlp":  # spectrum from the thin factors (QR + r×r SVD) vs a dense SVD, fp32
                    U, V = low.U.detach().float(), low.V.detach().float()
                    t_thin = timeit(lambda: factored_svdvals(U, V), warmup=1, iters=5, cuda=cuda)
                    t_svd = timeit(lambda: torch.linalg.svdvals(U @ V), warmup=1, iters=3, cuda=cuda)
                    spectra.append({"d": d, "out": n_out, "rank": r, "thin_ms": 1e3 * t_thin, "dense_svd_ms": 1e3 * t_svd,
                                    "speedup": t_svd / t_thin})
            if not args.no_profile and d == max(args.dims) and shape == args.shapes[-1]:
                r = max(1, int(min(args.ratios, key=lambda q: abs(q - 0.125)) * d))
                low = LowRankLinear(d, n_out, r, device=dev, dtype=dt, init="random")
                profiles[f"{shape}_d{d}_dense"] = profile_summary(fwd_bwd(dense, x, gy), cuda)
                profiles[f"{shape}_d{d}_rank{r}"] = profile_summary(fwd_bwd(low, x, gy), cuda)
    met = [r["target_met"] for r in rows if "target_met" in r and r["path"] == "torch"]
    emit("lowrank_layer", {**environment(dev), "dtype": args.dtype, "tokens": T, "iters": args.iters,
                           "timing": "cuda events" if cuda else "perf_counter", "targets": {str(k): v for k, v in TARGETS.items()},
                           "targets_met": f"{sum(met)}/{len(met)}", "results": rows, "spectrum": spectra, "profile": profiles})


if __name__ == "__main__":
    main()
