"""End-to-end pretraining throughput and quality: full rank vs fixed rank 0.25 vs InRank, same
config, same script. Tokens/s and MFU cover the whole run (InRank stage 1 and its rank changes
included; eval and checkpoints left out); FLOPs are counted on the model as it trains. Every
figure is also a ratio against the full-rank run. Prints JSON.

    python benchmarks/bench_inrank_gpt2.py                                  # CPU: tiny GPT-2
    python benchmarks/bench_inrank_gpt2.py --size medium --compile          # GPU: GPT-2 medium, bf16
    python benchmarks/bench_inrank_gpt2.py --arch llama --size 350m --compile
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
from _common import emit, environment  # noqa: E402

from fedlowrank.central import central_run_from_cfg, launch  # noqa: E402
from fedlowrank.federated.run_config import compose_cfg  # noqa: E402

RUNS = {  # name -> overrides on top of experiment=<arch>_full
    "full": [],
    "fixed": ["model.lowrank=fixed", "model.ratio=0.25"],
    "inrank": None,  # experiment=<arch>_inrank
}


def main() -> None:
    ap = argparse.ArgumentParser()
    gpu = torch.cuda.is_available()
    ap.add_argument("--arch", default="gpt2", choices=["gpt2", "llama"])
    ap.add_argument("--size", default="medium" if gpu else "tiny")
    ap.add_argument("--steps", type=int, default=600 if gpu else 200)
    ap.add_argument("--stage1", type=int, default=None, help="InRank stage-1 steps (default steps/3)")
    ap.add_argument("--block", type=int, default=1024 if gpu else 64)
    ap.add_argument("--batch", type=int, default=8 if gpu else 8)
    ap.add_argument("--lr", type=float, default=6e-4 if gpu else 3e-3)
    ap.add_argument("--init-rank", type=int, default=16 if gpu else 4)
    ap.add_argument("--compile", action="store_true", help="trainer.compile=true (inductor) for every run")
    ap.add_argument("--kernels", action="store_true")
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    stage1 = args.stage1 or max(1, args.steps // 3)
    rows = {}
    for name in args.runs:
        with tempfile.TemporaryDirectory() as d:
            exp = f"{args.arch}_inrank" if name == "inrank" else f"{args.arch}_full"
            ov = [f"experiment={exp}", *(RUNS[name] or []), f"model.size={args.size}",
                  f"trainer.max_steps={args.steps}", f"trainer.block_size={args.block}",
                  f"trainer.batch_size={args.batch}", f"trainer.lr={args.lr}", f"trainer.eval_interval={args.steps}",
                  "trainer.eval_iters=20", f"trainer.ckpt_interval={10**9}", "trainer.progress=false",
                  f"trainer.log_interval={max(1, args.steps // 10)}", f"trainer.compile={str(args.compile).lower()}",
                  f"trainer.use_kernels={str(args.kernels).lower()}", f"out_dir={d}"]
            if name == "inrank":
                ov += [f"method.stage1_steps={stage1}", f"method.init_rank={args.init_rank}",
                       f"method.buffer={args.init_rank}", f"method.check_interval={max(1, stage1 // 6)}"]
            res = launch(central_run_from_cfg(compose_cfg(ov)))
        rows[name] = {"params": res["params"], "tokens_per_s": res["tokens_per_s"], "train_time_s": res["train_time_s"],
                      "tokens_per_s_last_interval": res["tokens_per_s_last_interval"],
                      "flops_per_token_final": res["flops_per_token"], "model_flops": res["model_flops"],
                      "model_tflops_per_s": res["model_flops_per_s"] / 1e12, "mfu": res["mfu"],
                      "graph_compiles": res["graph_compiles"],
                      "eval_loss": res["final_eval"]["loss"], "eval_ppl": res["final_eval"]["ppl"],
                      "mean_rank": sum(res["ranks"].values()) / len(res["ranks"]) if res["ranks"] else None}
    base = rows.get("full")
    if base:
        for r in rows.values():
            r["params_ratio"] = r["params"] / base["params"]
            r["tokens_per_s_ratio"] = r["tokens_per_s"] / base["tokens_per_s"]
            r["ppl_ratio"] = r["eval_ppl"] / base["eval_ppl"]
    dev = "cuda" if gpu else "cpu"
    emit(f"e2e_{args.arch}", {**environment(dev), "dtype": "bf16 autocast" if gpu else "float32",
                              "arch": args.arch, "size": args.size, "steps": args.steps, "stage1_steps": stage1,
                              "block": args.block, "batch": args.batch, "compile": args.compile,
                              "kernels": args.kernels, "results": rows})


if __name__ == "__main__":
    main()
