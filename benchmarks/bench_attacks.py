"""One hostile client among 4, on the default federated config (``slice``, budgets 0.1/0.25/0.5/1.0, 15 rounds of
3 local epochs on digits), through the real client path (``fed.faults``). The attacker is client 3 (``top``: the
only full-rank client, so the top rank slots are trained by the attacker alone) or client 2 (``mid``: budget 0.5,
whose slots above 0.25 only it and client 3 train). Attacks: ``scale`` (the change 100x), ``budget`` (factors at
twice the rank it was sent), ``flip``/``flip1.4``/``flip5`` (the change reversed, k = 1, 1.4, 5), ``constant``
(every value just under the server's bound) and ``duplicate`` (an honest reply delivered twice); ``crash`` (the
client never replies) is the floor: the run without the attacker's data. Each under the
default settings (``fed.screen=exclude``, no clipping), the same on a Dirichlet 0.1 partition (``dirichlet``), the
earlier defaults (``clip``: ``fed.clip_auto=1.5`` without a screen), ``fed.robust=median``, ``fed.screen=loo``, and
on dense FedAvg the default screen (``fedavg``, ``fedavg_dirichlet``) against Flower's Krum (``krum``, f = 1) and the
coordinate-wise median (``fedmedian``), both without screen or clipping; ``norollback`` / ``dirichlet_norollback`` and
``fedavg_nocusum`` / ``fedavg_dirichlet_nocusum`` are the defaults without ``fed.screen_rollback`` or
``fed.screen_cusum`` (``nocusum``: the iid defaults without it);
per run: global test accuracy and each budget's (the global model
cut to that budget; 359 held-out images; BatchNorm models also with the aggregated statistics, ``*_running``), replies rejected, and honest updates the defence altered (scaled, capped
or rejected). Differences to the clean run of the same settings and seed, with paired 95 % intervals.

    python benchmarks/bench_attacks.py [--seeds 0 1 2 3 4] [--settings defaults dirichlet] [--attacks ...]
        [--attackers top mid] [--workers 2] [--out benchmarks/results_cpu/attacks.json]

Each run uses one thread (``--workers`` runs in parallel): the trajectories then do not depend on the machine's
core count (with torch's default threads, reductions split differently and seeds diverge).
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import emit, paired  # noqa: E402

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from fedlowrank.config import federated_run_from_cfg  # noqa: E402
from fedlowrank.federated.bn_stats import batchnorms, eval_model  # noqa: E402
from fedlowrank.federated.client import model_from_state  # noqa: E402
from fedlowrank.federated.report import budget_tag  # noqa: E402
from fedlowrank.federated.run_config import compose_cfg  # noqa: E402
from fedlowrank.federated.strategy import NoValidUpdates  # noqa: E402
from fedlowrank.federated.task import fed_data  # noqa: E402
from fedlowrank.runtime.inprocess import InProcessGrid, make_strategy, run_rounds  # noqa: E402
from fedlowrank.training.loop import evaluate_classifier  # noqa: E402

SETTINGS = {"defaults": [], "dirichlet": ["fed.partition=dirichlet", "fed.alpha=0.1"],  # defaults, Dirichlet 0.1
            # the defaults without undoing an excluded client's earlier rounds (before 2026-12-05's rollback)
            "norollback": ["fed.screen_rollback=0"],
            "nocusum": ["fed.screen_cusum=null"],  # the defaults without the cumulative rule (default on iid slice)
            "dirichlet_norollback": ["fed.partition=dirichlet", "fed.alpha=0.1", "fed.screen_rollback=0"],
            "clip": ["fed.clip_auto=1.5", "fed.screen=none"],  # the defaults before 2026-12-05
            "median": ["fed.robust=median"],
            "screen": ["fed.screen=loo", "fed.clip_auto=null"],  # opt-in leave-one-out screening, no clipping
            # a candidate honest-neutral combination: loose clipping and a loose screen
            "loose": ["fed.clip_auto=30", "fed.screen=loo", "fed.screen_tolerance=5"],
            # dense FedAvg: the default screen against Flower's Krum (f = 1), which needs models of one shape
            "fedavg": ["strategy=fedavg"],
            "fedavg_dirichlet": ["strategy=fedavg", "fed.partition=dirichlet", "fed.alpha=0.1"],
            # dense FedAvg without the cumulative rule (fed.screen_cusum, default there since 2026-12-05)
            "fedavg_nocusum": ["strategy=fedavg", "fed.screen_cusum=null"],
            "fedavg_dirichlet_nocusum": ["strategy=fedavg", "fed.partition=dirichlet", "fed.alpha=0.1",
                                         "fed.screen_cusum=null"],
            # the bound of the cumulative rule on slice iid (fed.screen_cusum) against the CNN's honest sums, at the
            # MLP's learning rate (the CNN's fed.lr=auto until 2026-12-06; 0.02 since: "cnn", its defaults)
            "cusum3": ["fed.screen_cusum=3.0"], "cnn": ["model=cnn"], "cnn_lr05": ["model=cnn", "fed.lr=0.05"],
            "cnn_cusum3": ["model=cnn", "fed.lr=0.05", "fed.screen_cusum=3.0"],
            "cnn_dirichlet": ["model=cnn", "fed.partition=dirichlet", "fed.alpha=0.1"],
            # the other vision models at 0.05 (their fed.lr=auto until 2026-12-06), 0.02 and 0.01
            **{f"{m}_lr{r[2:]}": [f"model={m}", f"fed.lr={r}"] for m in ("resnet", "vgg", "vit")
               for r in ("0.05", "0.02", "0.01")},
            # the ViT at its rate without undoing an excluded client's rounds (is the rollback what reversed changes cost?)
            "vit_norollback": ["model=vit", "fed.lr=0.01", "fed.screen_rollback=0"],
            "vit_rollback1": ["model=vit", "fed.lr=0.01", "fed.screen_rollback=1"],
            "vit_rollback5": ["model=vit", "fed.lr=0.01", "fed.screen_rollback=5"],
            "vit_40rounds": ["model=vit", "fed.rounds=40"],  # its defaults, trained nearer convergence
            # the BatchNorm models without the screen (clipping at 1.5 instead)
            "resnet_noscreen": ["model=resnet", "fed.lr=0.05", "fed.screen=none"],
            "vgg_noscreen": ["model=vgg", "fed.lr=0.02", "fed.screen=none"],
            "krum": ["strategy=fedavg", "fed.robust=krum", "fed.screen=none", "fed.clip_auto=null"],
            "fedmedian": ["strategy=fedavg", "fed.robust=median", "fed.screen=none", "fed.clip_auto=null"]}
ATTACKS = ("crash", "scale", "budget", "flip", "flip1.4", "flip5", "constant", "duplicate")  # crash: never replies
ATTACKERS = {"top": 3, "mid": 2}


def one_run(overrides: list[str], seed: int, tmp: str, attacker: int | None) -> dict:
    """Accuracies (global and per budget; NaN when the run stopped), rejections and altered honest updates
    (scaled, capped, rejected, or set aside by a rollback). One thread: the same numbers on any machine."""
    torch.set_num_threads(1)
    run = federated_run_from_cfg(compose_cfg(["mode=federated", f"seed={seed}", f"out_dir={tmp}/{seed}",
                                              "fed.eval_budgets=false", *overrides]))
    st = make_strategy(run)
    stopped = None
    try:
        run_rounds(st, InProcessGrid(run), run.fed.rounds)
    except NoValidUpdates as e:
        stopped = str(e)
    accs = {"global": float("nan")} if stopped else accuracies(run, st)
    altered = sum(1 for h in st.history for c in h["clients"]
                  if c["pid"] != attacker and (c.get("clipped_excess") or c.get("clipped_slots")))
    altered += sum(1 for _, pid in st.rejections if pid != attacker)
    return {"acc": accs, "rejected_attacker": sum(1 for _, pid in st.rejections if pid == attacker),
            "altered_honest": altered, "stopped": stopped, "excluded": dict(st.screen.excluded)}


def accuracies(run, st) -> dict[str, float]:
    """Test accuracy of the global model and of each budget's view, as the run evaluates them (``fed.bn_stats``);
    for BatchNorm models under ``fed.bn_stats=server`` also with the aggregated running statistics (``<key>_running``,
    the figures before 2026-12-06), from the same trained model."""
    test = DataLoader(fed_data(run).test, batch_size=256)
    views = {"global": st.global_state,
             **{budget_tag(b): st.method.view(st.global_state, b) for b in ({"ratio": r} for r in run.fed.rank_ratios)}}
    out = {k: evaluate_classifier(eval_model(run, v), test)["accuracy"] for k, v in views.items()}
    if run.fed.bn_stats == "server" and batchnorms(model_from_state(run, st.global_state)):
        out |= {f"{k}_running": evaluate_classifier(model_from_state(run, v), test)["accuracy"] for k, v in views.items()}
    return out


def cells(settings: list[str], attacks=ATTACKS, positions=tuple(ATTACKERS)) -> list[tuple[str, str, str]]:
    """(setting, attack, attacker position), clean runs first."""
    return [(s, "clean", "-") for s in settings] + [(s, a, p) for s in settings for a in attacks for p in positions]


def row(setting: str, attack: str, pos: str, runs: list[dict], clean: list[dict]) -> dict:
    keys = list(clean[0]["acc"])
    out = {"settings": setting, "attack": attack, "attacker": pos if pos == "-" else f"{pos} (client {ATTACKERS[pos]})",
           "stopped_runs": sum(r["stopped"] is not None for r in runs), "stop_message": next(
               (r["stopped"] for r in runs if r["stopped"]), None),
           "rejected_attacker_replies": [r["rejected_attacker"] for r in runs],
           "altered_honest_updates": [r["altered_honest"] for r in runs],
           # the round that excluded the attacker, per seed (None: never); honest exclusions are altered updates
           "excluded_round": [r["excluded"].get(ATTACKERS.get(pos, -1)) for r in runs],
           "accuracy": {k: statistics.fmean(r["acc"].get(k, float("nan")) for r in runs) for k in keys}}
    if attack != "clean":
        out["minus_clean_pt"] = {k: paired([100 * (r["acc"].get(k, float("nan")) - c["acc"][k])
                                            for r, c in zip(runs, clean)]) for k in keys}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--settings", nargs="+", default=["defaults", "dirichlet"], choices=list(SETTINGS))
    ap.add_argument("--attacks", nargs="*", default=list(ATTACKS), choices=ATTACKS, help="none: clean runs only")
    ap.add_argument("--attackers", nargs="+", default=list(ATTACKERS), choices=list(ATTACKERS))
    ap.add_argument("--out", default=None)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="runs in parallel, one thread each")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    t0 = time.perf_counter()
    todo = cells(args.settings, args.attacks, args.attackers)
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [([*SETTINGS[s], *([] if a == "clean" else [f'fed.faults=["{ATTACKERS[p]}:{a}"]'])], seed, tmp,
                 ATTACKERS.get(p)) for s, a, p in todo for seed in args.seeds]
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            done = pool.starmap(one_run, jobs, chunksize=1)
    n = len(args.seeds)
    res = {cell: done[i * n:(i + 1) * n] for i, cell in enumerate(todo)}
    for (setting, attack, pos), runs in res.items():
        logging.getLogger("bench").error("%s / %s / %s: %s", setting, attack, pos,
                                         [round(r["acc"]["global"], 4) for r in runs])
    rows = [row(s, a, p, runs, res[s, "clean", "-"]) for (s, a, p), runs in res.items()]
    emit("attacks", {"seeds": args.seeds, "config": "mode=federated (defaults), one attacker of 4 clients",
                     "workers": args.workers, "threads_per_run": 1, "wall_s": time.perf_counter() - t0,
                     "rows": rows}, args.out)


if __name__ == "__main__":
    main()
