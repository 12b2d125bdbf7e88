"""Federated quality with confidence intervals: every strategy under each task's settings, over ``--seeds`` (5 by
default), mean ± 95 % CI (Student t) of the final global test accuracy, and paired tests (by seed) of each claimed
difference: every low-rank rule against dense FedAvg in the same setting, and every treatment (FedProx, a server
optimizer) against the plain run of the same rule. Each run also reports the global model cut to each budget and
the clients' own held-out accuracy (mean, 10th percentile, worst).

Tasks (each stated in the JSON's ``settings``; runs go in worker processes, one thread each, ``--jobs`` at once,
through the in-process loop: the apps' strategy and client code without Ray):

* ``synthetic``: ``experiment=fed_synthetic`` (FedProx's Synthetic(α, β), 100 clients with power-law sizes, 10 per
  round, MLP 60-64-10, 100 rounds × 1 local epoch), Synthetic-IID and Synthetic(1, 1); pooled test set of every
  client's held-out 20 %.
* ``digits``: the default federated config (4 clients, budgets 0.1/0.25/0.5/1.0, 15 rounds × 3 local epochs) under
  Dirichlet 0.1 label skew: plain, FedProx (μ = 0.01), FedAvgM (momentum 0.9; server lr 1, Flower's default, and
  0.1, an effective lr of 1 as Hsu et al. advise), FedAdam (β 0.9/0.99, τ 1e-3; server lr 0.1, Flower's default,
  and 0.01). A run whose clients all go non-finite stops; it is counted as diverged and left out of the means.
* ``digits_iid``: the default federated run (iid over the 4 clients).
* ``shakespeare``: LEAF's setup (100 roles, 10 per round, 80 rounds); delegated to ``bench_fed_shakespeare.py``,
  which reports final accuracy with CIs, paired differences and rounds/bytes to a target.

    python benchmarks/bench_fed_quality.py --task synthetic --out benchmarks/results_cpu/fed_quality_synthetic.json
    python benchmarks/bench_fed_quality.py --task digits --out benchmarks/results_cpu/fed_quality_digits.json
    python benchmarks/bench_fed_quality.py --task shakespeare --seeds 0 1 2 3 4 --out ...

Writes the JSON, a PNG (means with 95 % CIs) and a Markdown table next to it.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import ci95, emit, environment, paired  # noqa: E402


@dataclass
class Task:
    base: list[str]
    settings: dict[str, list[str]]  # setting name -> overrides
    treatments: bool = False  # settings after the first are treatments of it (paired against it per strategy)
    strategies: list[str] = field(default_factory=lambda: ["fedavg", "fedlmt", "slice", "product"])
    note: str = ""


TASKS = {
    "synthetic": Task(["experiment=fed_synthetic", "fed.rounds=100"],
                      {"Synthetic-IID": ["data.iid=true"], "Synthetic(1,1)": ["data.alpha=1.0", "data.beta=1.0"]},
                      note="FedProx's Synthetic(α, β): 100 clients (power-law sizes), 10 per round, MLP 60-64-10, "
                           "100 rounds × 1 local epoch, SGD lr 0.05 momentum 0.9, budgets 0.1/0.25/0.5/1.0"),
    "digits": Task(["mode=federated", "fed.partition=dirichlet", "fed.alpha=0.1"],
                   {"plain": [], "FedProx μ=0.01": ["fed.prox_mu=0.01"], "FedAvgM": ["fed.server_opt=avgm"],
                    "FedAvgM lr 0.1": ["fed.server_opt=avgm", "fed.server_lr=0.1"], "FedAdam": ["fed.server_opt=adam"],
                    "FedAdam lr 0.01": ["fed.server_opt=adam", "fed.server_lr=0.01"]}, treatments=True,
                   note="sklearn digits, Dirichlet 0.1 label skew over 4 clients, budgets 0.1/0.25/0.5/1.0, 15 rounds "
                        "× 3 local epochs, SGD lr 0.05 momentum 0.9, 10 % of each client held out; 359 test images"),
    "digits_iid": Task(["mode=federated", "fed.partition=iid"], {"iid": []},
                       note="the default federated run: sklearn digits, iid over 4 clients, budgets 0.1/0.25/0.5/1.0, "
                            "15 rounds × 3 local epochs, 10 % of each client held out; 359 test images"),
}
METRICS = ("global", "clients_mean", "clients_p10", "clients_worst")


def one_run(job: tuple[str, str, list[str], str, int, str]) -> dict:
    """Final accuracies of one run (one thread): ``strategy`` is a fed strategy, or ``central`` (the dense model
    on the union of the clients' training data, same optimizer, as many epochs as a client does in total)."""
    task, setting, overrides, strategy, seed, tmp = job
    import logging

    import torch

    from fedlowrank.config import federated_run_from_cfg
    from fedlowrank.federated.run_config import compose_cfg

    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    run = federated_run_from_cfg(compose_cfg([*overrides, f"seed={seed}", f"out_dir={tmp}",
                                              *([] if strategy == "central" else [f"strategy={strategy}"])]))
    t0 = time.perf_counter()
    out = _central(run, seed) if strategy == "central" else _federated(run)
    return {"task": task, "setting": setting, "strategy": strategy, "seed": seed,
            "wall_s": time.perf_counter() - t0, **out}


def _federated(run) -> dict[str, float]:
    from torch.utils.data import DataLoader

    from fedlowrank.federated.bn_stats import eval_model
    from fedlowrank.federated.report import client_eval
    from fedlowrank.federated.task import fed_data
    from fedlowrank.runtime.inprocess import InProcessGrid, make_strategy, run_rounds
    from fedlowrank.training.loop import evaluate_classifier

    from fedlowrank.federated.strategy import NoValidUpdates

    st, fd = make_strategy(run), fed_data(run)
    try:
        run_rounds(st, InProcessGrid(run), run.fed.rounds)
    except NoValidUpdates:  # every client's loss went non-finite: the run diverged and stopped
        return {"global": float("nan"), "diverged_at_round": len(st.history)}
    test = DataLoader(fd.test, batch_size=512)
    out = {"global": evaluate_classifier(eval_model(run, st.global_state), test)["accuracy"]}
    if st.method.budget_views():
        for b in sorted(set(run.fed.rank_ratios)):
            view = st.method.view(st.global_state, {"ratio": b})
            out[f"budget {b}"] = evaluate_classifier(eval_model(run, view), test)["accuracy"]
    stats, _ = client_eval(run, st.method, st.global_state, fd, list(range(run.fed.num_clients)))
    for k in ("mean", "p10", "worst"):
        if f"clients_{k}_accuracy" in stats:
            out[f"clients_{k}"] = stats[f"clients_{k}_accuracy"]
    out["upload_mb"] = sum(h["upload_bytes"] for h in st.history) / 1e6
    return out


def _central(run, seed: int) -> dict[str, float]:
    import numpy as np
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from fedlowrank.federated.task import build_model, fed_data
    from fedlowrank.training.loop import evaluate_classifier, train_classifier

    f, fd = run.fed, fed_data(run)
    torch.manual_seed(seed)
    model = build_model(run)
    idx = torch.as_tensor(np.concatenate(fd.train_parts), dtype=torch.long)
    loader = DataLoader(TensorDataset(fd.x[idx], fd.y[idx]), batch_size=f.batch_size, shuffle=True)
    opt = torch.optim.SGD(model.parameters(), lr=f.lr, momentum=f.momentum, weight_decay=f.weight_decay)
    epochs = max(1, round(f.rounds * f.local_epochs * f.fraction_train))  # a client's share of the passes
    train_classifier(model, loader, opt, epochs=epochs)
    return {"global": evaluate_classifier(model, DataLoader(fd.test, batch_size=512))["accuracy"], "epochs": epochs}


def _ok(r: dict) -> bool:
    return r["global"] == r["global"]  # a diverged run's accuracy is NaN


def summarise(task: Task, runs: list[dict]) -> dict:
    """Per setting and strategy: mean ± 95 % CI of each metric over the runs that completed (``diverged``: how many
    did not); paired differences in points (by seed, over seeds where both completed) against dense FedAvg in the
    same setting and, for treatments, against the first setting with the same strategy."""
    by = {(r["setting"], r["strategy"]): {} for r in runs}
    for r in runs:
        by[(r["setting"], r["strategy"])][r["seed"]] = r
    first = next(iter(task.settings))
    res: dict[str, dict] = {}
    for (setting, strat), seeds in by.items():
        done = [seeds[s] for s in sorted(seeds) if _ok(seeds[s])]
        skip = ("task", "setting", "strategy", "seed", "epochs", "diverged_at_round")
        keys = list(dict.fromkeys(k for r in done for k in r if k not in skip)) or ["global"]
        row: dict = {k: {"mean": statistics.fmean(r[k] for r in done) if done else float("nan"),
                         "ci95": ci95([r[k] for r in done]), "per_seed": [r[k] for r in done]} for k in keys}
        row["diverged"] = f"{len(seeds) - len(done)}/{len(seeds)}"
        for name, ref in (("vs_fedavg", (setting, "fedavg")), (f"vs_{first}", (first, strat))):
            if ref == (setting, strat) or ref not in by or strat == "central" or (name != "vs_fedavg" and not task.treatments):
                continue
            both = [s for s in sorted(seeds) if s in by[ref] and _ok(seeds[s]) and _ok(by[ref][s])]
            if both:
                row[f"{name}_pt"] = paired([100 * (seeds[s]["global"] - by[ref][s]["global"]) for s in both])
        res.setdefault(setting, {})[strat] = row
    return res


def _cell(row: dict, key: str = "global") -> str:
    m, ci = row[key]["mean"], row[key]["ci95"]
    text = f"{m:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{m:.3f}"
    lost = int(row["diverged"].split("/")[0])
    return text + (f" (diverged in {row['diverged']} seeds)" if lost and key == "global" else "")


def _diff(d: dict | None) -> str:
    if not d:
        return ""
    lo, hi = d["ci95"] or (float("nan"), float("nan"))
    return f"{d['mean']:+.1f} pt [{lo:+.1f}, {hi:+.1f}]" + ("" if d["significant"] else " (n.s.)")


def markdown(task: Task, res: dict) -> str:
    """One table: rows strategy × setting; accuracy with CI, the smallest budget's view, clients' p10, and the
    paired differences."""
    first = next(iter(task.settings))
    head = ["setting", "strategy", "global accuracy [95 % CI]", "budget 0.1", "clients p10", "uploaded MB",
            "vs dense FedAvg"]
    if task.treatments:
        head.append(f"vs {first}")
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for setting, rows in res.items():
        for strat, row in rows.items():
            cells = [setting, strat, _cell(row), _cell(row, "budget 0.1") if "budget 0.1" in row else "",
                     _cell(row, "clients_p10") if "clients_p10" in row else "",
                     f"{row['upload_mb']['mean']:.1f}" if "upload_mb" in row else "", _diff(row.get("vs_fedavg_pt"))]
            if task.treatments:
                cells.append(_diff(row.get(f"vs_{first}_pt")))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(path: Path, title: str, res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(res)
    strats = list(dict.fromkeys(s for rows in res.values() for s in rows))
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(settings) * len(strats) / 3, 4.5))
    width = 0.8 / len(strats)
    for j, s in enumerate(strats):
        xs, ms, errs = [], [], [[], []]
        for i, setting in enumerate(settings):
            if s in res[setting]:
                g = res[setting][s]["global"]
                lo, hi = g["ci95"] or (g["mean"], g["mean"])
                lo, hi = max(lo, 0.0), min(hi, 1.0)  # an accuracy's interval, drawn within [0, 1]
                xs.append(i + (j - (len(strats) - 1) / 2) * width)
                if not res[setting][s].get("diverged", "0/").startswith("0/"):
                    ax.annotate(f"diverged {res[setting][s]['diverged']}", (xs[-1], 0.05), rotation=90, fontsize=7,
                                ha="center", va="bottom")
                ms.append(g["mean"])
                errs[0].append(g["mean"] - lo)
                errs[1].append(hi - g["mean"])
        ax.bar(xs, ms, width, yerr=errs, capsize=3, label=s)
    ax.set_xticks(range(len(settings)), settings)
    lows = [r["global"]["mean"] for rows in res.values() for r in rows.values() if r["global"]["mean"] == r["global"]["mean"]]
    ax.set_ylim(max(0.0, min(lows, default=0.0) - 0.1), 1.0)
    ax.set_ylabel("final global test accuracy (mean, 95 % CI)")
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="digits", choices=[*TASKS, "shakespeare"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--strategies", nargs="+", default=None)
    ap.add_argument("--settings", nargs="+", default=None, help="a subset of the task's settings")
    ap.add_argument("--no-central", action="store_true")
    ap.add_argument("--set", nargs="*", default=[], help="extra Hydra overrides for every run (smoke tests)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--replot", default=None, help="only rewrite the Markdown and PNG of this result JSON")
    args, rest = ap.parse_known_args()
    if args.replot:
        return write_views(Path(args.replot))
    if args.task == "shakespeare":
        import bench_fed_shakespeare

        sys.argv = [sys.argv[0], "--seeds", *map(str, args.seeds), "--jobs", str(args.jobs), *rest,
                    *(["--out", args.out] if args.out else [])]
        return bench_fed_shakespeare.main()
    if rest:
        ap.error(f"unknown arguments {rest}")
    task = TASKS[args.task]
    if args.settings:
        task.settings = {k: task.settings[k] for k in args.settings}
    strategies = args.strategies or task.strategies
    # central baseline: once per dataset (treatments share the first setting's data)
    central_settings = [] if args.no_central else list(task.settings)[:1] if task.treatments else list(task.settings)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(args.task, st, [*task.base, *task.settings[st], *args.set], s, seed, f"{tmp}/{i}")
                for i, (st, s, seed) in enumerate(
            [(st, s, seed) for st in task.settings for s in strategies for seed in args.seeds]
            + [(st, "central", seed) for st in central_settings for seed in args.seeds])]
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            runs = pool.map(one_run, jobs, chunksize=1)
    res = summarise(task, runs)
    meta = {"task": args.task, "settings": {"base": [*task.base, *args.set], **task.settings, "note": task.note},
            "seeds": args.seeds, "jobs": args.jobs, "date": time.strftime("%Y-%m-%d"),
            "total_wall_s": time.time() - t0, "environment": environment("cpu")}
    emit("fed_quality", {**meta, "results": res, "runs": runs}, args.out)
    if args.out:
        write_views(Path(args.out))


def write_views(path: Path) -> None:
    """The Markdown table and the PNG next to a result JSON (its summary recomputed from its stored runs)."""
    import json

    d = json.loads(path.read_text())
    settings = {k: v for k, v in d["settings"].items() if k not in ("base", "note")}
    task = Task(d["settings"]["base"], settings, treatments=TASKS[d["task"]].treatments)
    d["results"] = summarise(task, d["runs"])
    path.write_text(json.dumps({k: d[k] for k in d if k != "runs"} | {"runs": d["runs"]}, indent=2, default=float))
    path.with_suffix(".md").write_text(markdown(task, d["results"]))
    plot(path.with_suffix(".png"), f"{d['task']} ({len(d['seeds'])} seeds)", d["results"])


if __name__ == "__main__":
    main()
