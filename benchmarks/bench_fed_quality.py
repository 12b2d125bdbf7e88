"""Federated quality: every strategy × partition over seeds, next to dense FedAvg and central
training of the same dense model, mean ± std of the final global test accuracy, of the global model
cut to each client budget and (where clients hold out data) of the personalised accuracy.

Uses the in-process loop (the apps' strategy and client code, no Ray). ``--task digits``: the
default federated config (4 clients, budgets 0.1/0.25/0.5/1.0, 15 rounds × 3 local epochs), iid and
Dirichlet 0.5 / 0.1. ``--task shakespeare``: experiment fed_shakespeare (low-rank LSTM, one client
per speaking role of tinyshakespeare, natural partition).

    python benchmarks/bench_fed_quality.py [--seeds 0 1 2] [--out benchmarks/results_cpu/fed_quality.json]
    python benchmarks/bench_fed_quality.py --task shakespeare --seeds 0 --out benchmarks/results_cpu/fed_shakespeare.json
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import emit  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from fedlowrank.config import federated_run_from_cfg  # noqa: E402
from fedlowrank.federated.client import model_from_state  # noqa: E402
from fedlowrank.federated.run_config import compose_cfg  # noqa: E402
from fedlowrank.runtime.inprocess import InProcessGrid, make_strategy, run_rounds  # noqa: E402
from fedlowrank.federated.report import personalized_eval  # noqa: E402
from fedlowrank.federated.task import build_model, fed_data  # noqa: E402
from fedlowrank.training.loop import evaluate_classifier, train_classifier  # noqa: E402

TASKS = {  # task -> (base overrides, partitions)
    "digits": (["mode=federated"], {"iid": ["fed.partition=iid"],
                                    "dirichlet 0.5": ["fed.partition=dirichlet", "fed.alpha=0.5"],
                                    "dirichlet 0.1": ["fed.partition=dirichlet", "fed.alpha=0.1"]}),
    "shakespeare": (["experiment=fed_shakespeare"], {"natural (roles)": ["fed.partition=natural"]}),
}
STRATEGIES = ["fedavg", "fedlmt", "slice", "product"]


def _stats(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "runs": xs}


def federated(base: list[str], strategy: str, part: list[str], seed: int, tmp: str) -> dict[str, float]:
    run = federated_run_from_cfg(compose_cfg([*base, f"strategy={strategy}", f"seed={seed}",
                                              f"out_dir={tmp}/{strategy}-{seed}", *part]))
    st = make_strategy(run)
    run_rounds(st, InProcessGrid(run), run.fed.rounds)
    test = DataLoader(fed_data(run).test, batch_size=256)
    out = {"global": evaluate_classifier(model_from_state(run, st.global_state), test)["accuracy"]}
    if st.method.budget_views():
        for b in sorted(set(run.fed.rank_ratios)):
            view = st.method.view(st.global_state, {"ratio": b})
            out[f"budget {b}"] = evaluate_classifier(model_from_state(run, view), test)["accuracy"]
    personal = personalized_eval(run, st.method, st.global_state, fed_data(run))
    if personal is not None:
        out["personalised (mean over clients)"] = personal["mean"]
    return out


def central(base: list[str], part: list[str], seed: int, tmp: str) -> float:
    """The dense model on the union of the clients' training data, same optimizer, as many epochs as a
    client does in total."""
    run = federated_run_from_cfg(compose_cfg([*base, f"seed={seed}", f"out_dir={tmp}/central", *part]))
    f, fd = run.fed, fed_data(run)
    torch.manual_seed(seed)
    model = build_model(run)
    idx = torch.as_tensor(np.concatenate(fd.train_parts), dtype=torch.long)
    loader = DataLoader(TensorDataset(fd.x[idx], fd.y[idx]), batch_size=f.batch_size, shuffle=True)
    opt = torch.optim.SGD(model.parameters(), lr=f.lr, momentum=f.momentum, weight_decay=f.weight_decay)
    train_classifier(model, loader, opt, epochs=f.rounds * f.local_epochs)
    return evaluate_classifier(model, DataLoader(fd.test, batch_size=256))["accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="digits", choices=list(TASKS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--strategies", nargs="+", default=STRATEGIES, choices=STRATEGIES)
    ap.add_argument("--set", nargs="*", default=[], help="extra Hydra overrides, e.g. fed.rounds=20")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base, partitions = TASKS[args.task]
        base = [*base, *args.set]
        first = next(iter(partitions.values()))
        rows["central (dense)"] = {"all": {"global": _stats([central(base, first, s, tmp) for s in args.seeds])}}
        for strategy in args.strategies:
            rows[strategy] = {}
            for pname, part in partitions.items():
                res = [federated(base, strategy, part, s, tmp) for s in args.seeds]
                rows[strategy][pname] = {k: _stats([r[k] for r in res]) for k in res[0]}
                logging.getLogger("bench").error("%s %s: %.3f", strategy, pname, rows[strategy][pname]["global"]["mean"])
    emit("fed_quality", {"task": args.task, "seeds": args.seeds, "config": base, "wall_s": time.perf_counter() - t0,
                         "results": rows}, args.out)


if __name__ == "__main__":
    main()
