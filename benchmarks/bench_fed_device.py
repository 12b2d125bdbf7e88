"""Federated clients on the run's device: the same clients' local training on the CPU and on CUDA (fp32, and
bf16 autocast), in one invocation. Reports client-steps/s per device, the CUDA/CPU ratio, and how far each
device's replies are from the CPU replies (||a - b|| / ||a|| over a reply's float tensors, the worst reply), next
to the same distance between two CPU runs that differ only in the number of threads: the noise floor of a model
whose training amplifies rounding (BatchNorm ResNets do). Prints JSON.

    python benchmarks/bench_fed_device.py                       # digits: the default MLP, the CNN and the ResNet
    python benchmarks/bench_fed_device.py --tasks "model=cnn"   # one task: space-separated overrides
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import emit, environment  # noqa: E402

from fedlowrank.config import federated_run_from_cfg  # noqa: E402
from fedlowrank.federated.client import local_train  # noqa: E402
from fedlowrank.federated.methods import fed_method  # noqa: E402
from fedlowrank.federated.run_config import compose_cfg  # noqa: E402

TASKS = ["", "model=cnn", "model=resnet"]  # the default run; conv models on the same data


def _clients(run, clients: int, rounds: int) -> tuple[list[dict], float, int]:
    """Local training of ``clients`` clients for ``rounds`` rounds from one initial state: replies, seconds, steps."""
    method = fed_method(run)
    g = method.initial_state()
    views = [method.view(g, run.fed.budget(c)) for c in range(clients)]  # what the server sends each client
    local_train(run, 0, clients, views[0], 1)  # warm-up: data, CUDA context, kernels
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    replies, steps, t0 = [], 0, time.perf_counter()
    for r in range(1, rounds + 1):
        for c in range(clients):
            upd, m = local_train(run, c, clients, views[c], r)
            replies.append(upd)
            steps += int(m["steps"])
    return replies, time.perf_counter() - t0, steps


def _rel_diff(a: list[dict], b: list[dict]) -> float:
    """Worst reply's ||a - b|| / ||a|| over its float tensors."""
    worst = 0.0
    for x, y in zip(a, b):
        keys = [k for k, t in x.items() if t.is_floating_point()]
        diff = sum(float((x[k] - y[k]).double().square().sum()) for k in keys)
        norm = sum(float(x[k].double().square().sum()) for k in keys)
        worst = max(worst, (diff / max(norm, 1e-30)) ** 0.5)
    return worst


def task_row(overrides: list[str], clients: int, rounds: int, out: str) -> dict:
    """CPU, CPU on one thread (the noise floor), CUDA fp32 and CUDA bf16 for one task."""
    row: dict = {}
    runs = {"cpu": ["fed.device=cpu"], "cpu_1_thread": ["fed.device=cpu"]}
    if torch.cuda.is_available():
        runs.update(cuda=["fed.device=cuda"], cuda_bf16=["fed.device=cuda", "fed.bf16=true"])
    replies, threads = {}, torch.get_num_threads()
    for name, dev in runs.items():
        run = federated_run_from_cfg(compose_cfg(["mode=federated", f"out_dir={out}", f"fed.num_clients={clients}",
                                                  *overrides, *dev]))
        torch.set_num_threads(1 if name == "cpu_1_thread" else threads)
        replies[name], secs, steps = _clients(run, clients, rounds)
        row[name] = {"seconds": secs, "client_steps": steps, "client_steps_per_s": steps / secs}
    torch.set_num_threads(threads)
    for name in runs:
        if name != "cpu":
            row[name]["speed_vs_cpu"] = row[name]["client_steps_per_s"] / row["cpu"]["client_steps_per_s"]
            row[name]["rel_diff_vs_cpu"] = _rel_diff(replies["cpu"], replies[name])
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", nargs="+", default=TASKS, help="each: space-separated config overrides")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: the replies are compared with the CPU's
    torch.backends.cudnn.allow_tf32 = False
    rows = {}
    with tempfile.TemporaryDirectory() as d:
        for t in args.tasks:
            rows[t or "default"] = task_row(t.split(), args.clients, args.rounds, d)
    emit("fed_device", {"environment": environment("cuda" if torch.cuda.is_available() else "cpu"),
                        "clients": args.clients, "rounds": args.rounds, "results": rows})


if __name__ == "__main__":
    main()
