"""InRank vs full-rank (and fixed-rank) GPT-2 at the same config: tokens/s, parameters and
eval perplexity after the same number of optimizer steps on the embedded corpus. Prints JSON
with ratios against the full-rank run.

    python benchmarks/bench_inrank_gpt2.py [--size tiny] [--steps 200] [--kernels]
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import emit  # noqa: E402

from fedlowrank.central import central_run_from_cfg, launch  # noqa: E402
from fedlowrank.federated.deploy import compose_cfg  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    gpu = torch.cuda.is_available()
    ap.add_argument("--size", default="small" if gpu else "tiny")
    ap.add_argument("--steps", type=int, default=600 if gpu else 200)
    ap.add_argument("--stage1", type=int, default=None, help="InRank stage-1 steps (default steps/3)")
    ap.add_argument("--block", type=int, default=256 if gpu else 64)
    ap.add_argument("--batch", type=int, default=32 if gpu else 8)
    ap.add_argument("--lr", type=float, default=1e-3 if gpu else 3e-3)
    ap.add_argument("--init-rank", type=int, default=16 if gpu else 4)
    ap.add_argument("--kernels", action="store_true")
    ap.add_argument("--runs", nargs="+", default=["gpt2_full", "gpt2_fixed", "gpt2_inrank"])
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    stage1 = args.stage1 or max(1, args.steps // 3)
    rows = {}
    for exp in args.runs:
        with tempfile.TemporaryDirectory() as d:
            ov = [f"experiment={exp}", f"model.size={args.size}", f"trainer.max_steps={args.steps}",
                  f"trainer.block_size={args.block}", f"trainer.batch_size={args.batch}", f"trainer.lr={args.lr}",
                  f"trainer.eval_interval={args.steps}", "trainer.eval_iters=20", f"trainer.ckpt_interval={10**9}",
                  "trainer.progress=false", f"trainer.log_interval={max(1, args.steps // 10)}",
                  f"trainer.use_kernels={str(args.kernels).lower()}", f"out_dir={d}"]
            if exp.endswith("inrank"):
                ov += [f"method.stage1_steps={stage1}", f"method.init_rank={args.init_rank}",
                       f"method.buffer={args.init_rank}", f"method.check_interval={max(1, stage1 // 6)}"]
            res = launch(central_run_from_cfg(compose_cfg(ov)))
        rows[exp] = {"params": res["params"], "tokens_per_s": res["tokens_per_s"],
                     "eval_loss": res["final_eval"]["loss"], "eval_ppl": res["final_eval"]["ppl"],
                     "mean_rank": sum(res["ranks"].values()) / max(1, len(res["ranks"])) if res["ranks"] else None}
    base = rows.get("gpt2_full")
    if base:
        for r in rows.values():
            r["params_ratio"] = r["params"] / base["params"]
            r["tokens_per_s_ratio"] = r["tokens_per_s"] / base["tokens_per_s"]
            r["ppl_ratio"] = r["eval_ppl"] / base["eval_ppl"]
    emit("inrank_gpt2", {"device": "cuda" if gpu else "cpu", "size": args.size, "steps": args.steps,
                         "stage1_steps": stage1, "block": args.block, "batch": args.batch, "kernels": args.kernels,
                         "results": rows})


if __name__ == "__main__":
    main()
