"""ReLoRA's default settings against full rank: ``experiment=llama_relora`` as shipped (fractions of the run, rank a
quarter of each matrix's, peak LR 6e-3 after the warm start), the previous defaults (rank 8, warm start and cycles
of 50 steps, peak LR = trainer.lr) and ``experiment=llama_full`` on the same tokens and seeds. Held-out perplexity
over every window of the eval split; every ratio is against the full-rank run of the same seed in this invocation.
The default text is the embedded Python docs (``data=pydoc``, the experiments' own), so it runs offline.

    python benchmarks/bench_relora_defaults.py [--seeds 0 1 2] [--steps 300] [--text tinyshakespeare.txt]
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import emit  # noqa: E402
from reproduce import run_seeds  # noqa: E402

RUNS = {
    "full rank": ["experiment=llama_full"],
    "ReLoRA (default)": ["experiment=llama_relora"],
    "ReLoRA (previous defaults)": ["experiment=llama_relora", "method.r=8", "method.alpha=16", "method.lr=null",
                                   "method.warm_start_steps=50", "method.reset_every=50"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--text", default=None, help="training text (UTF-8; last 10%% held out); default: pydoc")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results_cpu" / "relora_defaults.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.text and not Path(args.text).is_file():
        raise SystemExit(f"--text {args.text} not found")
    common = [f"trainer.max_steps={args.steps}", "trainer.device=cpu"]
    data = ["data=textfile", f"data.train_path={Path(args.text).resolve()}"] if args.text else []
    per_seed = run_seeds(RUNS, args.seeds, lambda ov: common, data, evals=3)
    base = per_seed["full rank"]
    summary = {}
    for name, rows in per_seed.items():
        ppl = [r["held_out_ppl"] / b["held_out_ppl"] for r, b in zip(rows, base)]
        summary[name] = {"ppl_ratio_mean": statistics.mean(ppl), "ppl_ratio_max": max(ppl), "ppl_ratios": ppl,
                         "held_out_ppl": [r["held_out_ppl"] for r in rows],
                         "trainable_params_ratio": rows[0]["trainable_params"] / base[0]["trainable_params"],
                         "restarts": [r.get("relora_restarts") for r in rows]}
        logging.getLogger("bench").warning("%s: held-out ppl x%.3f of full rank (max x%.3f)", name,
                                           statistics.mean(ppl), max(ppl))
    emit("relora_defaults", {"seeds": args.seeds, "steps": args.steps, "model": "llama tiny",
                             "text": Path(args.text).name if args.text else "pydoc", "target_ppl_ratio_max": 1.10,
                             "summary": summary, "runs": per_seed}, args.out)


if __name__ == "__main__":
    main()
