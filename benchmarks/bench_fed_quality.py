"""Federated quality on digits: every strategy × partition over seeds, next to dense FedAvg and
central training of the same dense model, mean ± std of the final global test accuracy (and of
the global model cut to the smallest and largest client budget).

Uses the in-process loop (the apps' strategy and client code, no Ray) with the default
federated config (4 clients, budgets 0.1/0.25/0.5/1.0, 15 rounds × 3 local epochs).

    python benchmarks/bench_fed_quality.py [--seeds 0 1 2] [--out benchmarks/results_cpu/fed_quality.json]
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

import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from fedlowrank.config import federated_run_from_cfg  # noqa: E402
from fedlowrank.data.vision import load_image_data  # noqa: E402
from fedlowrank.federated.client import model_from_state  # noqa: E402
from fedlowrank.federated.deploy import compose_cfg  # noqa: E402
from fedlowrank.federated.inprocess import InProcessGrid, make_strategy, run_rounds  # noqa: E402
from fedlowrank.models.build import vision_config  # noqa: E402
from fedlowrank.models.vision import build_vision_model  # noqa: E402
from fedlowrank.training.loop import evaluate_classifier, train_classifier  # noqa: E402

PARTITIONS = {"iid": ["fed.partition=iid"], "dirichlet 0.5": ["fed.partition=dirichlet", "fed.alpha=0.5"],
              "dirichlet 0.1": ["fed.partition=dirichlet", "fed.alpha=0.1"]}
STRATEGIES = ["fedavg", "fedlmt", "slice", "product"]


def _stats(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "runs": xs}


def federated(strategy: str, part: list[str], seed: int, tmp: str) -> dict[str, float]:
    run = federated_run_from_cfg(compose_cfg(["mode=federated", f"strategy={strategy}", f"seed={seed}",
                                              f"out_dir={tmp}/{strategy}-{seed}", *part]))
    st = make_strategy(run)
    run_rounds(st, InProcessGrid(run), run.fed.rounds)
    data = load_image_data(run.data.name, run.data.root, run.data.download, run.data.seed)
    test = DataLoader(data.test_set(), batch_size=256)
    out = {"global": evaluate_classifier(model_from_state(run, st.global_state), test)["accuracy"]}
    if st.method.budget_views():
        for b in (min(run.fed.rank_ratios), max(run.fed.rank_ratios)):
            view = st.method.view(st.global_state, {"ratio": b})
            out[f"budget {b}"] = evaluate_classifier(model_from_state(run, view), test)["accuracy"]
    return out


def central(seed: int, tmp: str) -> float:
    """The dense model on all training data, same optimizer, as many epochs as a client does in total."""
    run = federated_run_from_cfg(compose_cfg(["mode=federated", f"seed={seed}", f"out_dir={tmp}/central"]))
    f = run.fed
    data = load_image_data(run.data.name, run.data.root, run.data.download, run.data.seed)
    torch.manual_seed(seed)
    model = build_vision_model(vision_config(run.model, run.data.name))
    loader = DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=f.batch_size, shuffle=True)
    opt = torch.optim.SGD(model.parameters(), lr=f.lr, momentum=f.momentum, weight_decay=f.weight_decay)
    train_classifier(model, loader, opt, epochs=f.rounds * f.local_epochs)
    return evaluate_classifier(model, DataLoader(data.test_set(), batch_size=256))["accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        rows["central (dense)"] = {"all": {"global": _stats([central(s, tmp) for s in args.seeds])}}
        for strategy in STRATEGIES:
            rows[strategy] = {}
            for pname, part in PARTITIONS.items():
                res = [federated(strategy, part, s, tmp) for s in args.seeds]
                rows[strategy][pname] = {k: _stats([r[k] for r in res]) for k in res[0]}
                logging.getLogger("bench").error("%s %s: %.3f", strategy, pname, rows[strategy][pname]["global"]["mean"])
    emit("fed_quality", {"data": "digits", "seeds": args.seeds, "config": "conf/mode/federated.yaml defaults",
                         "wall_s": time.perf_counter() - t0, "results": rows}, args.out)


if __name__ == "__main__":
    main()
