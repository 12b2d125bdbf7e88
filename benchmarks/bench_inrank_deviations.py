"""InRank's two deliberate deviations from its reference, measured: zero-U growth (new slots keep the function)
against the reference's slots (drawn as its never-used factor columns are initialised, which changes the
function), and the rank cap (full rank here, half of it in the reference). GPT-2 with the MLP factorized (the
reference's configuration), the same tokens, text and seeds for every run; held-out perplexity over every window
of the eval split, every ratio against the full-rank run of the same seed in the same invocation.

    python benchmarks/bench_inrank_deviations.py [--seeds 0 1] [--steps 400] [--text tinyshakespeare.txt]
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
from reproduce import SHAKESPEARE, run_seeds  # noqa: E402

RUNS = {
    "full rank": ["experiment=gpt2_full"],
    "InRank (zero-U growth, cap 1.0: default)": ["experiment=gpt2_inrank"],
    "InRank (reference growth)": ["experiment=gpt2_inrank", "method.growth=reference"],
    "InRank (cap 0.5, as the reference)": ["experiment=gpt2_inrank", "method.max_rank_ratio=0.5"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--text", default=str(SHAKESPEARE))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results_cpu" / "inrank_deviations.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not Path(args.text).is_file():
        raise SystemExit(f"--text {args.text} not found")
    common = ["model.size=tiny", f"trainer.max_steps={args.steps}", "trainer.batch_size=8", "trainer.block_size=128",
              "trainer.lr=3e-3", "trainer.warmup_steps=20", "trainer.device=cpu", "method.check_interval=25",
              f"method.stage1_steps={args.steps // 2}", "method.init_rank=2", "method.buffer=16"]
    data = ["data=textfile", f"data.train_path={Path(args.text).resolve()}"]
    per_seed = run_seeds(RUNS, args.seeds, lambda ov: [o for o in common if not (
        o.startswith("method.") and "inrank" not in ov[0])], data, evals=4)
    base = per_seed["full rank"]
    summary = {}
    for name, rows in per_seed.items():
        ppl = [r["held_out_ppl"] / b["held_out_ppl"] for r, b in zip(rows, base)]
        params = [r["params"] / b["params"] for r, b in zip(rows, base)]
        summary[name] = {"ppl_ratio_mean": statistics.mean(ppl), "ppl_ratios": ppl,
                         "params_ratio_mean": statistics.mean(params), "mean_rank": [r.get("mean_rank") for r in rows]}
        logging.getLogger("bench").warning("%s: held-out ppl x%.3f of full rank, params x%.3f", name,
                                           statistics.mean(ppl), statistics.mean(params))
    emit("inrank_deviations", {"seeds": args.seeds, "steps": args.steps, "common": common,
                               "text": Path(args.text).name, "summary": summary, "runs": per_seed}, args.out)


if __name__ == "__main__":
    main()
