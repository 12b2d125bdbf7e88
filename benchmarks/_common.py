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


def ci95(xs: list[float]) -> list[float] | None:
    """Student-t 95 % confidence interval of the mean of ``xs`` (None for fewer than 2 values or a NaN)."""
    if len(xs) < 2 or any(x != x for x in xs):
        return None
    from scipy import stats

    m, se = statistics.fmean(xs), statistics.stdev(xs) / len(xs) ** 0.5
    h = float(stats.t.ppf(0.975, len(xs) - 1)) * se
    return [m - h, m + h]


def paired(diffs: list[float]) -> dict:
    """Paired comparison from per-seed differences: mean, 95 % t-interval, two-sided p (paired t-test) and
    whether the interval excludes 0."""
    from scipy import stats

    out = {"mean": statistics.fmean(diffs), "ci95": ci95(diffs), "n": len(diffs), "p": None, "significant": False}
    if out["ci95"] is not None:
        sd = statistics.stdev(diffs)
        if sd > 0:
            t = out["mean"] / (sd / len(diffs) ** 0.5)
            out["p"] = float(2 * stats.t.sf(abs(t), len(diffs) - 1))
        else:
            out["p"] = 0.0 if out["mean"] != 0 else 1.0
        lo, hi = out["ci95"]
        out["significant"] = bool(lo > 0 or hi < 0)
    return out


def _tree(pid: int) -> set[int]:
    """``pid`` and all its descendants (Linux ``/proc``)."""
    from pathlib import Path

    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
                parent[int(d)] = int(stat[stat.rindex(")") + 2:].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    tree, frontier = {pid}, [pid]
    while frontier:
        frontier = [c for c, p in parent.items() if p in frontier and c not in tree]
        tree.update(frontier)
    return tree


def tree_memory_mb(pid: int) -> tuple[float, float]:
    """(summed RSS, summed PSS) of ``pid``'s process tree, MiB; PSS counts shared pages once overall."""
    from pathlib import Path

    rss = pss = 0
    for p in _tree(pid):
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return rss / 1024, pss / 1024


def _sigterm_raises() -> None:
    """In the main thread, SIGTERM becomes SystemExit(143) (where nothing else handles it), so that a benchmark
    killed with it stops the contender it is running instead of leaving it behind."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def run_sampled(cmd: list[str], cwd, env: dict | None = None, every_s: float = 0.2, timeout: float = 1800) -> dict:
    """Run ``cmd`` to its end, sampling its process tree's memory: output, return code, unix launch time, wall
    seconds and the peak RSS and PSS (MiB)."""
    import subprocess
    import threading

    from fedlowrank.runtime.reaper import terminate

    t_launch, t0 = time.time(), time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, done = [0.0, 0.0], threading.Event()

    def sample() -> None:
        while not done.wait(every_s):
            rss, pss = tree_memory_mb(proc.pid)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _sigterm_raises()
    try:
        text, _ = proc.communicate(timeout=timeout)
    except BaseException:  # Ctrl-C, the timeout, or SIGTERM: the contender goes too (it stops its own children)
        terminate(proc, grace=60)
        raise
    finally:
        done.set()
    wall = time.perf_counter() - t0
    th.join()
    return {"text": text, "returncode": proc.returncode, "t_launch": t_launch, "wall_s": wall,
            "peak_rss_mb": peak[0], "peak_pss_mb": peak[1]}
