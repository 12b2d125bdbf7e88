"""Direction of each client's change against the other clients' changes of the same round (issue 34's question:
can a server tell a reversed change from an honest one by its direction?). Default task in-process, per round and
client: the cosine of its change to the mean (and the coordinate-wise median) of the other clients' changes, on
the group every client of the round trains: dense tensors, and the change of the product U[:, :s] V[:s] of the slots
at least 3 clients hold. Clean runs and one ``flip`` attacker (top budget, pid 3; middle budget, pid 2), iid (the
default partition) and Dirichlet 0.1; prints min and median per client over the rounds.

    python scripts/attack_directions.py [--seeds 0 1] [--rounds 15]
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fedlowrank.config import federated_run_from_cfg  # noqa: E402
from fedlowrank.federated.aggregation import factor_prefixes  # noqa: E402
from fedlowrank.federated.run_config import compose_cfg  # noqa: E402
from fedlowrank.federated.strategy import HeteroRankStrategy  # noqa: E402
from fedlowrank.runtime.inprocess import InProcessGrid, make_strategy, run_rounds  # noqa: E402


def shared_change(view: dict, update: dict, slots: dict[str, int]) -> torch.Tensor:
    """The change on the round's shared group, flat, float64."""
    parts = [(t.double() - view[k].double()).reshape(-1) for k, t in update.items()
             if not k.endswith((".U", ".V")) and t.is_floating_point() and k in view and view[k].shape == t.shape]
    for p, s in slots.items():
        U, V, U0, V0 = (x[f"{p}.{n}"].double() for x in (update, view) for n in "UV")
        parts.append((U[:, :s] @ V[:s] - U0[:, :s] @ V0[:s]).reshape(-1))
    return torch.cat(parts)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm() + 1e-30))


def one(seed: int, rounds: int, extra: list[str]) -> dict[int, list[tuple[float, float]]]:
    """Per client: (cosine to the others' mean, to their median) for every round."""
    seen: list[list[tuple[int, dict, dict]]] = []
    run = federated_run_from_cfg(compose_cfg(["mode=federated", "out_dir=/tmp/attack_directions", f"seed={seed}",
                                              f"fed.rounds={rounds}", "fed.eval_budgets=false", *extra]))
    st = make_strategy(run)
    clip = st._clip_auto  # the strategy's own hook point: the round's accepted (pid, update, ..., view) tuples
    st._clip_auto = lambda rnd, valid: (seen.append([(v[0], v[4], v[1]) for v in valid]), clip(rnd, valid))[1]
    run_rounds(st, InProcessGrid(run), rounds)
    out: dict[int, list[tuple[float, float]]] = {}
    for items in seen:
        slots = {}
        for p in factor_prefixes(items[0][2]):
            ranks = sorted(u[f"{p}.U"].shape[1] for _, _, u in items)
            slots[p] = ranks[-3] if len(ranks) >= 3 else ranks[0]
        ch = {pid: shared_change(v, u, slots) for pid, v, u in items}
        for pid, c in ch.items():
            others = torch.stack([o for q, o in ch.items() if q != pid])
            out.setdefault(pid, []).append((cosine(c, others.mean(0)), cosine(c, others.median(0).values)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    for seed in args.seeds:
        for part in ([], ["fed.partition=dirichlet", "fed.alpha=0.1"]):
            for attack in ([], ['fed.faults=["3:flip"]'], ['fed.faults=["2:flip"]']):
                res = one(seed, args.rounds, [*part, *attack])
                cells = [f"pid{p}: mean min {min(a for a, _ in v):+.2f} med {statistics.median(a for a, _ in v):+.2f}"
                         f", median min {min(b for _, b in v):+.2f} med {statistics.median(b for _, b in v):+.2f}"
                         for p, v in sorted(res.items())]
                print(f"seed {seed} {'dirichlet 0.1' if part else 'iid'} {attack[0][13:-2] if attack else 'clean'}: "
                      + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
