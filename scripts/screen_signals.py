"""What the default screen (``fed.screen=exclude``) sees: per round and client, how much including its reply raises
the loss of the server's sample (nats; the largest rise at its own or a larger budget), on the default task without
clipping, iid and Dirichlet 0.1, clean and with one attacker (top budget, pid 3; budget 0.5, pid 2). Attack runs
drop the attacker before aggregating (an oracle), so the trajectory is the defended one and the attacker's rises are
those it would show there. Prints, per cell, the rises' quantiles (min, 10 %, median, 90 %, max) for honest
clients (clean runs) and for the attacker, and the same of each client's largest one-sided cumulative sum of its
rises as ``fed.screen_cusum`` counts them (with the direction gate except on dense ``fedavg``: a slow, persistent
attack's signal); this sets ``fed.screen_nats`` and ``fed.screen_cusum`` (docs/reliability.md).

    python scripts/screen_signals.py [--seeds 0 1 2 3] [--attacks flip flip1.4 flip5 constant scale]
        [--partitions iid "dirichlet 0.1"] [--attackers top mid] [--overrides strategy=fedavg]
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fedlowrank.config import federated_run_from_cfg  # noqa: E402
from fedlowrank.federated.directions import counted, round_cosines  # noqa: E402
from fedlowrank.federated.run_config import compose_cfg  # noqa: E402
from fedlowrank.federated.screening import LooScreen  # noqa: E402
from fedlowrank.runtime.inprocess import InProcessGrid, make_strategy, run_rounds  # noqa: E402

PARTITIONS = {"iid": [], "dirichlet 0.1": ["fed.partition=dirichlet", "fed.alpha=0.1"]}
ATTACKERS = {"top": 3, "mid": 2}


def rises(seed: int, extra: list[str], attacker: int | None) -> dict[int, list[tuple[float, float]]]:
    """Partition id -> (its rise, what the cumulative rule adds for it: :func:`directions.counted`) in every round it
    replied (the attacker's replies dropped after measuring)."""
    run = federated_run_from_cfg(compose_cfg(["mode=federated", "out_dir=/tmp/screen_signals", f"seed={seed}",
                                              "fed.eval_budgets=false", "fed.clip_auto=null", *extra]))
    st = make_strategy(run)
    loo = LooScreen(run, st.method)
    out: dict[int, list[float]] = {}

    def measure(rnd: int, valid: list) -> tuple[list, int]:
        cos = round_cosines(run.strategy, valid)  # as the screen's cumulative rule (Screen._accumulate)
        for i, reached in loo.leave_one_out(valid, st._combine):
            rise = max(f - w for f, w, _ in reached)
            out.setdefault(valid[i][0], []).append((rise, counted(rise, cos[i])))
        return [v for v in valid if v[0] != attacker], 0

    st._screen = measure  # the strategy's own hook point, after the per-reply checks
    run_rounds(st, InProcessGrid(run), run.fed.rounds)
    return out


def quantiles(x: list[float]) -> str:
    return " ".join(f"{np.quantile(x, q):.3g}" for q in (0, 0.1, 0.5, 0.9, 1))


def cusum(r: list[float]) -> float:
    """The largest one-sided cumulative sum of a client's rises over its rounds (S = max(0, S + rise)): a client
    whose inclusion keeps raising the loss a little accumulates; one that helps as often as it hurts does not."""
    s = top = 0.0
    for x in r:
        s = max(0.0, s + x)
        top = max(top, s)
    return top


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--attacks", nargs="*", default=["flip", "flip1.4", "flip5", "constant", "scale"])
    ap.add_argument("--partitions", nargs="+", default=list(PARTITIONS), choices=list(PARTITIONS))
    ap.add_argument("--attackers", nargs="+", default=list(ATTACKERS), choices=list(ATTACKERS))
    ap.add_argument("--overrides", nargs="*", default=[], help="more Hydra overrides, e.g. strategy=fedavg")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    for part in args.partitions:
        for attack, pos in [("clean", None)] + [(a, p) for a in args.attacks for p in args.attackers]:
            pid = ATTACKERS.get(pos)
            faults = [f'fed.faults=["{pid}:{attack}"]'] if pos else []
            honest, bad, honest_sum, bad_sum = [], [], [], []
            for seed in args.seeds:
                for p, r in rises(seed, [*PARTITIONS[part], *args.overrides, *faults], pid).items():
                    (bad if p == pid else honest).extend(x for x, _ in r)
                    (bad_sum if p == pid else honest_sum).append(cusum([c for _, c in r]))
            # honest rises of attack runs include rounds with the attacker in the aggregate: only clean runs say
            print(f"{part} | {attack} {pos or ''} | " + (
                f"attacker: {quantiles(bad)}; cumulative: {quantiles(bad_sum)}" if pos else
                f"honest: {quantiles(honest)}; cumulative: {quantiles(honest_sum)}"), flush=True)


if __name__ == "__main__":
    main()
