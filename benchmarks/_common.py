"""Shared helpers for benchmark scripts: timing and JSON output."""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable

import torch


def timeit(fn: Callable[[], object], warmup: int = 3, iters: int = 20, cuda: bool = False) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def emit(name: str, payload: dict, out: str | None = None) -> None:
    """Print the JSON result and optionally write it to ``out`` (or $BENCH_OUT/<name>.json)."""
    text = json.dumps({"benchmark": name, **payload}, indent=2, default=float)
    print(text)
    out = out or (os.path.join(os.environ["BENCH_OUT"], f"{name}.json") if os.environ.get("BENCH_OUT") else None)
    if out:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            f.write(text)
    sys.stdout.flush()
