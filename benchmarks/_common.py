"""Shared helpers for benchmark scripts: timing, environment record and JSON output."""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch


def timeit(fn: Callable[[], object], warmup: int = 3, iters: int = 20, cuda: bool = False) -> float:
    """Median seconds per call. On CUDA each call is bracketed by CUDA events (device time, no host
    sync inside the timed region); on CPU by ``perf_counter``."""
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events) / 1e3
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def environment(device: torch.device | str) -> dict:
    """Device, library versions and host: recorded in every result file."""
    device = torch.device(device)
    env = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
           "host_cpus": os.cpu_count(), "platform": platform.platform()}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            pass
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


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
