"""Federated communication: bytes per round for each strategy vs the same model dense.

Runs short simulations on the embedded digits data and compares the upload/download bytes
per round with what FedAvg of the dense model would move (2 × clients × dense bytes).

    python benchmarks/bench_fed_bytes.py [--rounds 2] [--model mlp]
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import emit  # noqa: E402

from fedlowrank.federated.run_config import compose_cfg  # noqa: E402
from fedlowrank.runtime.runner import run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--strategies", nargs="+", default=["fedlmt", "slice", "product"])
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = []
    for strat in args.strategies:
        with tempfile.TemporaryDirectory() as d:
            cfg = compose_cfg(["mode=federated", f"strategy={strat}", f"model={args.model}",
                               f"fed.rounds={args.rounds}", f"out_dir={d}"])
            res = run(cfg)
        nclients = res["num_clients"]
        dense_round = 2 * nclients * res["dense_model_bytes"]
        per_round = [r["upload_bytes"] + r["download_bytes"] for r in res["rounds_detail"]]
        mean = sum(per_round) / len(per_round)
        rows.append({"strategy": strat, "bytes_per_round": mean, "dense_fedavg_bytes_per_round": dense_round,
                     "ratio_vs_dense": mean / dense_round, "final_accuracy": res["final"]["global_accuracy"],
                     "global_model_bytes": res["global_model_bytes"], "dense_model_bytes": res["dense_model_bytes"]})
    emit("fed_bytes", {"model": args.model, "rounds": args.rounds, "results": rows})


if __name__ == "__main__":
    main()
