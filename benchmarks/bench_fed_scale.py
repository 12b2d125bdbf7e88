"""Federated scale on CPU: 100 and 1000 simulated clients with per-round sampling (fed.fraction_train)
and local work set in steps, through the in-process loop (the apps' strategy and client code, no
Ray). Records partition time (computed once, then cached), per-round time, clients per second,
peak resident memory and the global accuracy after the rounds, against a 10-client run of the same
config. Prints JSON.

``--runtime superlink`` runs the same configs through ``python main.py mode=federated fed.runtime=superlink``
(Flower's non-deprecated simulation runtime: a private ``flower-superlink --simulation``, Ray workers), one
process tree per client count; round times are the server's own (``metrics.json``), memory is the peak of
the summed RSS of the whole process tree (SuperLink, simulation process, Ray), sampled every 0.25 s. The server
assigns partitions itself (no query round to every node), so ``round_s_first`` and ``outside_rounds_s`` (start-up,
evaluation, shutdown) show whether start-up grows with the number of clients.

    python benchmarks/bench_fed_scale.py [--clients 10 100 1000] [--rounds 5] [--out ...]
    python benchmarks/bench_fed_scale.py --runtime superlink --out benchmarks/results_cpu/fed_scale_superlink.json
    python benchmarks/bench_fed_scale.py --runtime local --data synthetic --clients 10 1000 10000
"""
from __future__ import annotations

import argparse
import logging
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.pop("FEDLOWRANK_CACHE_DIR", None)  # no node cache: time the partitioning itself
from _common import emit, environment, run_sampled  # noqa: E402

from torch.utils.data import DataLoader  # noqa: E402

from fedlowrank.config import federated_run_from_cfg  # noqa: E402
from fedlowrank.federated.bn_stats import eval_model  # noqa: E402
from fedlowrank.federated.run_config import compose_cfg  # noqa: E402
from fedlowrank.runtime.inprocess import InProcessGrid, make_strategy  # noqa: E402
from fedlowrank.federated.task import fed_data  # noqa: E402
from fedlowrank.training.loop import evaluate_classifier  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def one(n: int, rounds: int, per_round: int, steps: int, tmp: str) -> dict:
    frac = min(1.0, per_round / n)
    run = federated_run_from_cfg(compose_cfg([*overrides(n, rounds, per_round, steps), f"out_dir={tmp}/n{n}"]))
    t0 = time.perf_counter()
    fd = fed_data(run)
    t_part = time.perf_counter() - t0
    t0 = time.perf_counter()
    fed_data(run)
    t_cached = time.perf_counter() - t0
    strategy, grid = make_strategy(run), InProcessGrid(run)
    times, sent = [], []
    for rnd in range(1, rounds + 1):
        t0 = time.perf_counter()
        msgs = list(strategy.configure_train(rnd, None, None, grid))
        strategy.aggregate_train(rnd, grid.send_and_receive(msgs))
        times.append(time.perf_counter() - t0)
        sent.append(len(msgs))
    acc = evaluate_classifier(eval_model(run, strategy.global_state), DataLoader(fd.test, batch_size=256))
    return {"clients": n, "fraction_train": frac, "clients_per_round": statistics.fmean(sent), "local_steps": steps,
            "partition_s": t_part, "partition_cached_s": t_cached,
            "examples_per_client": {"min": min(map(len, fd.train_parts)), "max": max(map(len, fd.train_parts))},
            "round_s_median": statistics.median(times), "round_s_first": times[0],
            "clients_per_s": sum(sent) / sum(times), "peak_rss_mb": peak_rss_mb(),
            "global_accuracy": acc["accuracy"]}


DATA = {"digits": [], "synthetic": ["data=synthetic", "fed.partition=natural"]}


def overrides(n: int, rounds: int, per_round: int, steps: int) -> list[str]:
    return ["mode=federated", f"fed.num_clients={n}", f"fed.fraction_train={min(1.0, per_round / n)}",
            f"fed.local_steps={steps}", "fed.local_epochs=1000", "fed.min_partition_size=1", "fed.batch_size=8",
            f"fed.rounds={rounds}"]


def one_main(n: int, rounds: int, per_round: int, steps: int, tmp: str, runtime: str = "superlink",
             data: list[str] | None = None, eval_every: int = 1) -> dict:
    """``main.py ... fed.runtime=<runtime>`` in a child process: wall, server round times, tree peak RSS."""
    import json

    out = Path(tmp) / f"{runtime}{n}"
    cmd = [sys.executable, "main.py", *overrides(n, rounds, per_round, steps), *(data or []), f"fed.runtime={runtime}",
           "fed.eval_budgets=false", f"fed.eval_every={eval_every}", f"out_dir={out}"]
    env = {k: v for k, v in os.environ.items() if k != "FEDLOWRANK_CACHE_DIR"}  # simulations use no node cache
    done = run_sampled(cmd, Path(__file__).resolve().parents[1], env=env, every_s=0.25)
    if done["returncode"] != 0:
        raise RuntimeError(f"{n} clients: exit {done['returncode']}\n{done['text'][-3000:]}")
    wall, t_launch, peak = done["wall_s"], done["t_launch"], (done["peak_rss_mb"], done["peak_pss_mb"])
    m = json.loads((out / "metrics.json").read_text())
    times = [r["round_s"] for r in m["rounds_detail"]]
    starts = [r["started_at"] for r in m["rounds_detail"]]
    gaps = [b - a for a, b in zip(starts, starts[1:])]  # a round, the evaluation after it, the next one's sampling
    sent = [r["clients_ok"] for r in m["rounds_detail"]]
    return {"clients": n, "fraction_train": min(1.0, per_round / n), "clients_per_round": statistics.fmean(sent),
            "local_steps": steps, "wall_s": wall, "round_s_median": statistics.median(times),
            "round_s_first": times[0], "outside_rounds_s": wall - sum(times), "runtime": runtime,
            "round_start_to_start_s_median": statistics.median(gaps) if gaps else None,
            "startup_s": starts[0] - t_launch,  # launch to round 1's start
            "outside_rounds_note": "start-up, evaluation, shutdown",
            "clients_per_s": sum(sent) / sum(times), "peak_tree_rss_mb": peak[0],
            "peak_tree_pss_mb": peak[1],  # shared pages (libraries, the mapped data) counted once
            "global_accuracy": m["final"]["global_accuracy"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--per-round", type=int, default=10, help="clients sampled per round")
    ap.add_argument("--steps", type=int, default=5, help="local steps per client per round")
    ap.add_argument("--runtime", choices=["inprocess", "superlink", "simulation", "local"], default="inprocess")
    ap.add_argument("--data", choices=["digits", "synthetic"], default="digits",
                    help="synthetic: FedProx's Synthetic(1, 1), one client per user (main.py runtimes only)")
    ap.add_argument("--eval-every", type=int, default=1, help="fed.eval_every (main.py runtimes only)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.clients:
            if args.runtime == "inprocess":
                rows.append(one(n, args.rounds, args.per_round, args.steps, tmp))
            else:
                rows.append(one_main(n, args.rounds, args.per_round, args.steps, tmp, args.runtime, DATA[args.data],
                                     args.eval_every))
            logging.getLogger("bench").error("%s", rows[-1])
    base = rows[0]
    for r in rows:
        r["round_time_ratio"] = r["round_s_median"] / base["round_s_median"]
    note = ("in-process loop; memory is the process's peak RSS so far (monotone across rows)"
            if args.runtime == "inprocess" else
            f"main.py fed.runtime={args.runtime}; one process tree per row; round_s from the server's metrics.json; "
            "startup_s: launch to round 1's start; round_start_to_start_s: one round's start to the next's (the "
            "round, the evaluation after it, the next round's sampling); memory: the tree's peak summed RSS and PSS")
    for r in rows:
        if r.get("startup_s") and base.get("startup_s"):
            r["startup_ratio"] = r["startup_s"] / base["startup_s"]
        if r.get("round_start_to_start_s_median") and base.get("round_start_to_start_s_median"):
            r["start_to_start_ratio"] = r["round_start_to_start_s_median"] / base["round_start_to_start_s_median"]
    data = "digits (1,437 training images)" if args.data == "digits" else "Synthetic(1, 1), one client per user"
    emit("fed_scale", {**environment("cpu"), "data": data, "rounds": args.rounds, "eval_every": args.eval_every,
                       "runtime": args.runtime, "note": note, "results": rows}, args.out)


if __name__ == "__main__":
    main()
