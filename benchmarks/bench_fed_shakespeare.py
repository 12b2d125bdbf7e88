"""Federated Shakespeare as LEAF runs it: ``experiment=fed_shakespeare`` (the 100 roles of tinyshakespeare with the
most text, 10 sampled per round, 1 local epoch, LEAF's evaluation protocol: the next character after each held-out
80-character context) for ``--rounds`` rounds (LEAF's script: 80), dense FedAvg against the low-rank rules at the
default budgets (0.1 / 0.25 / 0.5 / 1.0 by partition id).

Reports, per method and over ``--seeds`` (paired by seed with dense FedAvg): the accuracy curve, the final accuracy
(mean of the last 5 rounds, to smooth the 10-client sampling), whether the curve has plateaued (gain over its last
20 rounds), and the rounds and uploaded bytes to reach ``--target`` (first round at or above it). Runs go in worker
processes (one thread each, ``--jobs`` at once), through the in-process loop (the apps' strategy and client code).

LEAF's anchor (its Shakespeare tutorial, FedAvg, 10 clients per round, 1 local epoch, lr 0.8, minibatch 10, embedding
8 + 2 x 256 LSTM): weighted test accuracy about 0.52 after 70-80 rounds, on a 5 % sample of the complete works.

    python benchmarks/bench_fed_shakespeare.py [--rounds 80] [--seeds 0 1 2] [--model lstm] \\
        [--out benchmarks/results_cpu/fed_shakespeare_leaf.json]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import ci95, emit, environment, paired  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
METHODS = {"fedavg (dense)": ["strategy=fedavg"], "slice": ["strategy=slice"], "product": ["strategy=product"],
           "fedlmt": ["strategy=fedlmt"]}


def one_run(job: tuple[str, list[str], int, int, str]) -> dict:
    """Per-round LEAF-protocol accuracy and cumulative uploaded bytes of one run (one thread)."""
    method, overrides, seed, rounds, tmp = job
    import logging

    import torch
    from torch.utils.data import DataLoader

    from fedlowrank.config import federated_run_from_cfg
    from fedlowrank.federated.bn_stats import eval_model
    from fedlowrank.federated.run_config import compose_cfg
    from fedlowrank.federated.task import fed_data
    from fedlowrank.runtime.inprocess import InProcessGrid, make_strategy
    from fedlowrank.training.loop import evaluate_classifier

    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    run = federated_run_from_cfg(compose_cfg(["experiment=fed_shakespeare", f"data.path={SHAKESPEARE}", *overrides,
                                              f"fed.rounds={rounds}", f"seed={seed}", f"out_dir={tmp}"]))
    st, grid = make_strategy(run), InProcessGrid(run)
    test = DataLoader(fed_data(run).test, batch_size=512)
    rows, up, t0 = [], 0, time.perf_counter()
    for rnd in range(1, rounds + 1):
        st.aggregate_train(rnd, grid.send_and_receive(list(st.configure_train(rnd, None, None, grid))))
        up += st.history[-1]["upload_bytes"]
        acc = evaluate_classifier(eval_model(run, st.global_state), test)["accuracy"]
        rows.append({"round": rnd, "accuracy": acc, "upload_bytes": up})
    return {"method": method, "seed": seed, "rounds": rows, "wall_s": time.perf_counter() - t0,
            "test_windows": len(fed_data(run).test)}


def final(run: dict, last: int = 5) -> float:
    return statistics.fmean(r["accuracy"] for r in run["rounds"][-last:])


def summarise(runs: list[dict], base: dict[int, dict], target: float) -> dict:
    """Final accuracy (mean of the last 5 rounds), plateau gain, rounds/bytes to target; paired with FedAvg."""
    finals = [final(r) for r in runs]
    hits = [next((x for x in r["rounds"] if x["accuracy"] >= target), None) for r in runs]
    reached = [h for h in hits if h]
    gain = [final(r) - statistics.fmean(x["accuracy"] for x in r["rounds"][-25:-20]) for r in runs
            if len(r["rounds"]) >= 25]  # the last 5 rounds against the 5 that end 20 rounds earlier
    out = {"final_accuracy": statistics.fmean(finals), "final_accuracy_ci95": ci95(finals), "per_seed": finals,
           "gain_last_20_rounds": statistics.fmean(gain) if gain else None, "reached_target": f"{len(reached)}/{len(runs)}",
           "rounds_to_target": statistics.fmean(h["round"] for h in reached) if reached else None,
           "upload_mb_to_target": statistics.fmean(h["upload_bytes"] for h in reached) / 1e6 if reached else None,
           "upload_mb_total": statistics.fmean(r["rounds"][-1]["upload_bytes"] for r in runs) / 1e6,
           "wall_s": statistics.fmean(r["wall_s"] for r in runs),
           "curve": [statistics.fmean(r["rounds"][i]["accuracy"] for r in runs) for i in range(len(runs[0]["rounds"]))]}
    diffs = [100 * (final(r) - final(base[r["seed"]])) for r in runs if r["seed"] in base]
    if diffs and runs[0]["method"] != "fedavg (dense)":
        out["diff_vs_fedavg_pt"] = paired(diffs)
        both = [(h, next((x for x in base[r["seed"]]["rounds"] if x["accuracy"] >= target), None))
                for h, r in zip(hits, runs)]
        ratios = [h["upload_bytes"] / b["upload_bytes"] for h, b in both if h and b]
        out["upload_to_target_ratio_vs_fedavg"] = statistics.fmean(ratios) if ratios else None
        out["upload_to_target_ratio_ci95"] = ci95(ratios)
        out["rounds_to_target_diff_vs_fedavg"] = paired([h["round"] - b["round"] for h, b in both if h and b])
    return out


def plot(path: Path, res: dict, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for m, r in res.items():
        axes[0].plot(range(1, len(r["curve"]) + 1), r["curve"], label=m)
    axes[0].set_xlabel("round")
    for m, r in res.items():
        mb = [r["upload_mb_total"] * (i + 1) / len(r["curve"]) for i in range(len(r["curve"]))]  # ~linear in rounds
        axes[1].plot(mb, r["curve"], label=m)
    axes[1].set_xlabel("uploaded MB (all clients, cumulative, mean)")
    for ax in axes:
        ax.axhline(target, color="grey", ls="--", lw=0.8)
        ax.set_ylabel("held-out next-character accuracy (LEAF protocol)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Federated Shakespeare, 100 roles, 10 per round (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def resummarise(path: Path, more: list[dict] | None = None, note: str | None = None) -> None:
    """Recompute the per-method summary of a result file from its stored runs, after adding ``more`` runs (of other
    methods, same rounds, seeds and model: runs are deterministic per seed, so the file's FedAvg runs pair with them);
    redraw its PNG."""
    import json

    d = json.loads(path.read_text())
    if more:
        d["runs"] += more
        d.setdefault("added", []).append(note)
        for m in dict.fromkeys(r["method"] for r in more):
            d["methods"].setdefault(m, {})
    base = {r["seed"]: r for r in d["runs"] if r["method"] == "fedavg (dense)"}
    d["methods"] = {m: summarise([r for r in d["runs"] if r["method"] == m], base, d["target"]) for m in d["methods"]}
    path.write_text(json.dumps(d, indent=2, default=float))
    plot(path.with_suffix(".png"), d["methods"], d["target"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=80)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=["fedavg (dense)", "slice", "product"], choices=list(METHODS))
    ap.add_argument("--model", default="lstm", help="lstm (small) or lstm_leaf (LEAF's 2 x 256)")
    ap.add_argument("--target", type=float, default=0.40)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--resummarise", default=None, help="recompute a result file's summary from its runs; no training")
    ap.add_argument("--add-to", default=None, help="add these runs to an existing result file (same rounds, seeds, "
                    "model) and summarise them against its FedAvg runs")
    args = ap.parse_args()
    if args.resummarise:
        return resummarise(Path(args.resummarise))
    if not SHAKESPEARE.is_file():
        sys.exit(f"needs {SHAKESPEARE}")
    if args.add_to:  # checked before any training
        import json

        d = json.loads(Path(args.add_to).read_text())
        if (d["rounds"], sorted(d["seeds"]), d["model"]) != (args.rounds, sorted(args.seeds), args.model):
            sys.exit(f"{args.add_to} has rounds/seeds/model {d['rounds']}/{d['seeds']}/{d['model']}")
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(m, [*METHODS[m], f"model={args.model}"], s, args.rounds, f"{tmp}/{i}")
                for i, (m, s) in enumerate((m, s) for m in args.methods for s in args.seeds)]
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            runs = pool.map(one_run, jobs, chunksize=1)
    if args.add_to:
        return resummarise(Path(args.add_to), runs, f"{args.methods} added {time.strftime('%Y-%m-%d')} "
                           f"in {time.time() - t0:.0f} s with --jobs {args.jobs}")
    base = {r["seed"]: r for r in runs if r["method"] == "fedavg (dense)"}
    res = {m: summarise([r for r in runs if r["method"] == m], base, args.target) for m in args.methods}
    meta = {"rounds": args.rounds, "seeds": args.seeds, "model": args.model, "target": args.target,
            "jobs": args.jobs, "date": time.strftime("%Y-%m-%d"), "total_wall_s": time.time() - t0,
            "test_windows": runs[0]["test_windows"],
            "leaf_anchor": "FedAvg, 10 clients/round, E=1, lr 0.8, emb 8 + 2x256 LSTM: ~0.52 weighted test accuracy "
                           "at rounds 70-80 (LEAF tutorial figure; 5% sample of the complete works, sliding windows)"}
    emit("fed_shakespeare_leaf", {**meta, "environment": environment("cpu"), "methods": res,
                                  "runs": [{k: v for k, v in r.items()} for r in runs]}, args.out)
    if args.out:
        plot(Path(args.out).with_suffix(".png"), res, args.target)


if __name__ == "__main__":
    main()
