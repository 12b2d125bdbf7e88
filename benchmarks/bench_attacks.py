"""One hostile client among 4, on the default federated config (``slice``, budgets 0.1/0.25/0.5/1.0, 15 rounds of
3 local epochs on digits): client 3 is the only full-rank client, so the top rank slots are trained by the
attacker alone. Attacks: ``scale`` (a finite change 100x its real one, every round) and ``budget`` (factors of
twice the rank it was sent, i.e. a claimed larger budget). Each under the default settings (``fed.clip_auto`` on)
and under ``fed.robust=median``, with the defences that matter switched off beside them;
global test accuracy (359 held-out images), mean over seeds, and the difference to the clean run of the same
settings and seed.

    python benchmarks/bench_attacks.py [--seeds 0 1 2 3 4] [--out benchmarks/results_cpu/attacks.json]
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
from _common import ci95, emit  # noqa: E402

from torch.utils.data import DataLoader  # noqa: E402

from fedlowrank.config import federated_run_from_cfg  # noqa: E402
from fedlowrank.federated.client import model_from_state  # noqa: E402
from fedlowrank.federated.run_config import compose_cfg  # noqa: E402
from fedlowrank.federated.strategy import NoValidUpdates  # noqa: E402
from fedlowrank.federated.task import fed_data  # noqa: E402
from fedlowrank.runtime.inprocess import InProcessGrid, make_strategy, run_rounds  # noqa: E402
from fedlowrank.training.loop import evaluate_classifier  # noqa: E402

OFF = ["fed.clip_auto=null"]
SETTINGS = {  # name -> (overrides, clean baseline name)
    "defaults": ([], "defaults"),
    "no defence": (OFF, "no defence"),
    "median": (["fed.robust=median"], "median"),
    "median without clipping": (["fed.robust=median", *OFF], "median"),
}
ATTACKS = {"clean": [], "scale": ['fed.faults=["3:scale"]'], "budget": ['fed.faults=["3:budget"]']}
CELLS = [("defaults", "clean"), ("no defence", "clean"), ("median", "clean"),
         ("defaults", "scale"), ("no defence", "scale"),
         ("median", "scale"), ("median without clipping", "scale"),
         ("defaults", "budget"), ("median", "budget")]


def accuracy(overrides: list[str], seed: int, tmp: str) -> tuple[float, int]:
    """(global test accuracy, replies rejected over the run); NaN when the run aborted."""
    run = federated_run_from_cfg(compose_cfg(["mode=federated", f"seed={seed}", f"out_dir={tmp}/{seed}",
                                              "fed.eval_budgets=false", *overrides]))
    st = make_strategy(run)
    try:
        run_rounds(st, InProcessGrid(run), run.fed.rounds)
    except NoValidUpdates:  # every honest client's loss went NaN: the run stops with an error
        return float("nan"), sum(h["rejected"] for h in st.history)
    test = DataLoader(fed_data(run).test, batch_size=256)
    acc = evaluate_classifier(model_from_state(run, st.global_state), test)["accuracy"]
    return acc, sum(h["rejected"] for h in st.history)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    t0 = time.perf_counter()
    res: dict[tuple[str, str], list[tuple[float, int]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for setting, attack in CELLS:
            res[setting, attack] = [accuracy([*SETTINGS[setting][0], *ATTACKS[attack]], s, tmp) for s in args.seeds]
            logging.getLogger("bench").error("%s / %s: %s", setting, attack, res[setting, attack])
    rows = []
    for (setting, attack), runs in res.items():
        clean = [a for a, _ in res[SETTINGS[setting][1], "clean"]]
        accs = [a for a, _ in runs]
        rows.append({"settings": setting, "attack": attack, "accuracy": accs, "mean": statistics.fmean(accs),
                     "aborted_runs": sum(a != a for a in accs),
                     "minus_clean_pt": [100 * (a - c) for a, c in zip(accs, clean)],
                     "mean_minus_clean_pt": statistics.fmean(100 * (a - c) for a, c in zip(accs, clean)),
                     "ci95_minus_clean_pt": ci95([100 * (a - c) for a, c in zip(accs, clean)]),
                     "worst_minus_clean_pt": min(100 * (a - c) for a, c in zip(accs, clean)),
                     "rejected_replies": [r for _, r in runs]})
    emit("attacks", {"seeds": args.seeds, "config": "mode=federated (defaults), attacker = client 3 (budget 1.0)",
                     "wall_s": time.perf_counter() - t0, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
