"""Deployed vs simulated round time: the same config run by Flower's simulation runtime (``main.py``: a
private SuperLink in simulation mode, Ray) and by a loopback SuperLink + N SuperNodes (``flwr run``):
Flower's stock SuperNodes with and without the node-side cache (data, partitions, composed Hydra config),
SuperNodes in ``--isolation process`` beside :mod:`fedlowrank.deploy.warmexec` (ClientApps forked from a
process that has imported torch), and the same with the SuperNode loop polling every 0.1 s
(:mod:`fedlowrank.deploy.fastnode`; Flower waits 3 s when idle). Round time is the server's own measure
(models sent -> replies aggregated); the whole ``flwr run`` wall time is recorded beside it. Prints JSON with
ratios against the simulation and the extra seconds per round.

    python -m fedlowrank.deploy.bench [--nodes 3] [--rounds 3] [--local-epochs 1] [--fastest-only] [--out ...]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # needs a project checkout
from _common import emit, environment  # noqa: E402

from fedlowrank.deploy.loopback import PROJECT, flwr_run, loopback_deployment  # noqa: E402


def rounds_s(metrics: Path) -> list[float]:
    return [r["round_s"] for r in json.loads(metrics.read_text())["rounds_detail"]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--fastest-only", action="store_true", help="only the warm, fast-polling deployment")
    ap.add_argument("--extra", default="", help="more Hydra overrides, e.g. 'experiment=fed_shakespeare'")
    ap.add_argument("--tmp-beside-project", action="store_true",
                    help="work in a temporary directory beside the checkout, so that relative data paths such as "
                         "the default ../shared/data/tinyshakespeare.txt resolve for the nodes as for main.py")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    ov = (f"{args.extra} fed.num_clients={args.nodes} fed.rounds={args.rounds} fed.local_epochs={args.local_epochs} "
          "fed.timeout=300").strip()
    if "fed.rank" not in args.extra:  # the default budgets, at most one per node (full rank kept)
        ov += " fed.rank_ratios=[" + ",".join(map(str, [0.1, 0.25, 0.5, 1.0][-min(args.nodes, 4):])) + "]"
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        subprocess.run([sys.executable, "main.py", "mode=federated", "fed.runtime=superlink", *ov.split(),
                        f"out_dir={tmp}/sim"], cwd=PROJECT,
                       check=True, capture_output=True,
                       env={k: v for k, v in os.environ.items() if k != "FEDLOWRANK_CACHE_DIR"})  # no node cache
        sim = "simulation (SuperLink --simulation, Ray)"
        rows[sim] = {"round_s": rounds_s(Path(tmp) / "sim" / "metrics.json"), "wall_s": time.time() - t0}
        setups = [("deployed, warm executor + node cache + 0.1 s node poll", f"{tmp}/fcache", True, 0.1),
                  ("deployed, warm executor + node cache", f"{tmp}/wcache", True, None),
                  ("deployed, node cache", f"{tmp}/cache", False, None),
                  ("deployed, no cache", "off", False, None)]
        for name, cache, warm, poll in setups[:1] if args.fastest_only else setups:
            # the nodes' working directory: one level below the checkout's parent with --tmp-beside-project
            work = Path(tempfile.mkdtemp(prefix="fed_deploy_", dir=PROJECT.parent if args.tmp_beside_project else tmp))
            try:
                with loopback_deployment(args.nodes, work, {"FEDLOWRANK_CACHE_DIR": cache}, warm=warm,
                                         node_poll_s=poll) as lb:
                    t0 = time.time()
                    res = flwr_run(lb, ov, "runs/x", timeout=900)
                    wall = time.time() - t0
                metrics = work / "runs" / "x" / "metrics.json"
                if not metrics.exists():
                    raise RuntimeError(f"{name}: no metrics ({(res.stdout + res.stderr)[-3000:]})")
                rows[name] = {"round_s": rounds_s(metrics), "wall_s": wall}
            finally:
                shutil.rmtree(work, ignore_errors=True)
    base = statistics.median(rows[sim]["round_s"])
    for r in rows.values():
        r["round_s_median"] = statistics.median(r["round_s"])
        r["round_time_ratio_vs_simulation"] = r["round_s_median"] / base
        r["overhead_s_vs_simulation"] = r["round_s_median"] - base  # fixed cost per round, whatever the work
    emit("fed_deploy", {**environment("cpu"), "nodes": args.nodes, "rounds": args.rounds, "overrides": ov,
                        "results": rows}, args.out)


if __name__ == "__main__":
    main()
