"""Side-by-side reproduction: full rank, fixed low rank, InRank, ReLoRA and WeLore on the same
model, seed, tokens and text, scored on held-out text (every window of the eval split).

Writes ``reproduce.json``, ``reproduce.md`` (the README table) and ``reproduce.png`` (held-out
ppl curves) to ``--out``. Every figure is also given as a ratio against the full-rank run of
the same invocation: held-out ppl, params, trainable params, optimizer-state bytes and
tokens/s over the whole run (every stage; eval and checkpoints left out).

    python benchmarks/reproduce.py --config cpu     # LLaMA mini, byte tokens, <= 25 min on 2 cores
    python benchmarks/reproduce.py --config gpu     # LLaMA 130m (a lent GPU)
    python benchmarks/reproduce.py --text my.txt [--eval-text held_out.txt]
    python benchmarks/reproduce.py --config cpu --sweep   # rank-vs-quality frontier (frontier.{json,md,png})

``--sweep`` runs, on the same tokens and text: InRank at thresholds 0.9 / 0.95 / 0.99 with the MLP factorized and
with MLP + attention, and for each target set fixed-rank runs matched in parameters to its InRank runs plus one
more ratio; it checks that every InRank point lies on or below the fixed-rank frontier (no fixed-rank run with
at most its parameters has a lower held-out ppl) and the MLP-only InRank at the paper's threshold against
1.03x full rank, and plots held-out ppl against parameters and against training FLOPs.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import emit  # noqa: E402

from fedlowrank.central import central_run_from_cfg, launch  # noqa: E402
from fedlowrank.federated.run_config import compose_cfg  # noqa: E402

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"

# per config: shared trainer settings and each method's overrides (what differs from full rank)
CONFIGS: dict[str, dict] = {
    "cpu": {
        "common": ["model.size=mini", "trainer.max_steps=1500", "trainer.batch_size=16", "trainer.block_size=128",
                   "trainer.lr=3e-3", "trainer.warmup_steps=30", "trainer.device=cpu"],
        "runs": {
            "full rank": ["experiment=llama_full"],
            "fixed rank 0.25": ["experiment=llama_full", "model.lowrank=fixed", "model.ratio=0.25"],
            "InRank": ["experiment=llama_inrank", "method.stage1_steps=500", "method.check_interval=25",
                       "method.init_rank=2", "method.buffer=16"],
            "ReLoRA": ["experiment=llama_relora", "method.restart_warmup_steps=10"],  # the defaults (10 named: --steps scales it)
            "WeLore": ["experiment=llama_welore", "method.pretrain_steps=1200", "method.target_reduction=0.5",
                       "method.kind=params"],
        },
    },
    "gpu": {
        "common": ["model.size=130m", "trainer.max_steps=3000", "trainer.batch_size=32", "trainer.block_size=256",
                   "trainer.lr=1e-3", "trainer.warmup_steps=200"],
        "runs": {
            "full rank": ["experiment=llama_full"],
            "fixed rank 0.25": ["experiment=llama_full", "model.lowrank=fixed", "model.ratio=0.25"],
            "InRank": ["experiment=llama_inrank", "method.stage1_steps=1000", "method.check_interval=25",
                       "method.init_rank=2", "method.buffer=100"],
            "ReLoRA": ["experiment=llama_relora", "method.lr=2e-3"],  # twice trainer.lr, as the default's
            "WeLore": ["experiment=llama_welore", "method.pretrain_steps=2500", "method.target_reduction=0.5",
                       "method.kind=params"],
        },
    },
}
# the CPU targets: (max held-out ppl ratio, max params ratio)
TARGETS = {"InRank": (1.03, 0.40), "ReLoRA": (1.10, None), "WeLore": (1.08, None)}


def run_one(name: str, overrides: list[str], common: list[str], data: list[str], out: Path, evals: int) -> dict:
    steps = int(next(o for o in common if o.startswith("trainer.max_steps=")).split("=")[1])
    ov = [*overrides, *common, *data, "trainer.eval_full=true", f"trainer.eval_interval={max(1, steps // evals)}",
          f"trainer.ckpt_interval={10 ** 9}", "trainer.progress=false", f"trainer.log_interval={max(1, steps // 20)}",
          f"out_dir={out}"]
    t0 = time.perf_counter()
    res = launch(central_run_from_cfg(compose_cfg(ov)))
    row = {"overrides": overrides, "held_out_loss": res["final_eval"]["loss"], "held_out_ppl": res["final_eval"]["ppl"],
           "params": res["params"], "trainable_params": res["trainable_params"],
           "optimizer_state_bytes": res["optimizer_state_bytes"], "tokens_per_s": res["tokens_per_s"],
           "train_time_s": res["train_time_s"], "wall_s": time.perf_counter() - t0, "model_flops": res["model_flops"],
           "curve": [(e["step"], e["ppl"]) for e in res["evals"]]}
    if res.get("ranks"):
        row["ranks"] = res["ranks"]
        row["mean_rank"] = sum(res["ranks"].values()) / len(res["ranks"])
    if "welore" in res:
        w = res["welore"]
        row["welore"] = {k: w.get(k) for k in ("params_before", "params_after", "dense_eval", "compressed_eval")}
        row["welore"]["target_reduction"] = w["plan"]["reduction"]
    if "relora_restarts" in res:
        row["relora_restarts"] = res["relora_restarts"]
    logging.getLogger("reproduce").warning("%s: held-out ppl %.3f, %d params, %.0f tokens/s, %.0f s", name,
                                           row["held_out_ppl"], row["params"], row["tokens_per_s"], row["wall_s"])
    return row


def run_seeds(runs: dict[str, list[str]], seeds: list[int], common: Callable[[list[str]], list[str]],
              data: list[str], evals: int) -> dict[str, list[dict]]:
    """Every run at every seed (``common(overrides)``: the shared settings for that run), in a temporary
    directory; per run, one row per seed in seed order (curves dropped)."""
    per_seed: dict[str, list[dict]] = {name: [] for name in runs}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for i, (name, ov) in enumerate(runs.items()):
                row = run_one(name, [*ov, f"seed={seed}"], common(ov), data, Path(tmp) / f"{seed}-{i}", evals)
                row.pop("curve")
                per_seed[name].append(row)
    return per_seed


def add_ratios(rows: dict[str, dict]) -> None:
    base = rows["full rank"]
    for r in rows.values():
        for k in ("held_out_ppl", "params", "trainable_params", "optimizer_state_bytes", "tokens_per_s"):
            r[f"{k}_ratio"] = r[k] / base[k]


def verdicts(rows: dict[str, dict], config: str) -> dict[str, dict]:
    out = {}
    for name, (ppl_max, params_max) in TARGETS.items():
        if name not in rows:
            continue
        r = rows[name]
        ok = r["held_out_ppl_ratio"] <= ppl_max and (params_max is None or r["params_ratio"] <= params_max)
        out[name] = {"ppl_ratio_max": ppl_max, "params_ratio_max": params_max, "met": bool(ok),
                     "applies": config == "cpu"}
    return out


def markdown(rows: dict[str, dict], meta: dict, verdict: dict) -> str:
    lines = [f"Held-out ppl after {meta['steps']} steps ({meta['model']}, {meta['text']}; "
             f"{meta['device']}); ratios against full rank in the same run.", "",
             "| run | held-out ppl | × full | params × | trainable × | optimizer state × | tokens/s × (whole run) | target |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        v = verdict.get(name)
        tgt = "" if not v else (f"ppl ≤ {v['ppl_ratio_max']}×" + (f", params ≤ {v['params_ratio_max']}×"
                                                               if v["params_ratio_max"] else "")
                               + (" — met" if v["met"] else " — **missed**"))
        lines.append(f"| {name} | {r['held_out_ppl']:.3f} | {r['held_out_ppl_ratio']:.3f} | {r['params_ratio']:.3f} | "
                     f"{r['trainable_params_ratio']:.3f} | {r['optimizer_state_bytes_ratio']:.3f} | "
                     f"{r['tokens_per_s_ratio']:.2f} | {tgt} |")
    return "\n".join(lines) + "\n"


def plot(rows: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in rows.items():
        xs, ys = zip(*r["curve"])
        ax.plot(xs, ys, marker=".", label=f"{name} ({r['held_out_ppl']:.2f})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out perplexity")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    ap.add_argument("--text", default=str(SHAKESPEARE), help="training text (UTF-8)")
    ap.add_argument("--eval-text", default=None, help="held-out eval text (default: the last 10%% of --text)")
    ap.add_argument("--runs", nargs="+", default=None, help="subset of runs (full rank is always included)")
    ap.add_argument("--steps", type=int, default=None, help="override trainer.max_steps (method steps scale along)")
    ap.add_argument("--evals", type=int, default=10, help="eval points per run")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results_<config>)")
    ap.add_argument("--sweep", action="store_true", help="the rank-vs-quality frontier instead of the methods")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg = CONFIGS[args.config]
    common = list(cfg["common"])
    if args.steps:
        common = [o for o in common if not o.startswith("trainer.max_steps=")] + [f"trainer.max_steps={args.steps}"]
    if not Path(args.text).is_file():
        raise SystemExit(f"--text {args.text} not found")
    data = ["data=textfile", f"data.train_path={Path(args.text).resolve()}"]
    if args.eval_text:
        data.append(f"data.eval_path={Path(args.eval_text).resolve()}")
    if args.sweep:
        from _frontier import frontier_main

        return frontier_main(args, cfg, common, data, run_one, emit)
    names = ["full rank"] + [n for n in cfg["runs"] if n != "full rank" and (not args.runs or n in args.runs)]
    scale = (args.steps or 0) / int(next(o for o in cfg["common"] if "max_steps" in o).split("=")[1])
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(names):
            ov = cfg["runs"][name]
            if scale:  # keep method schedules proportional to a shorter/longer run
                ov = [_scale(o, scale) for o in ov]
            rows[name] = run_one(name, ov, common, data, Path(tmp) / str(i), args.evals)
    add_ratios(rows)
    import torch

    meta = {"config": args.config, "text": Path(args.text).name + (f" / {Path(args.eval_text).name}"
                                                                   if args.eval_text else " (last 10% held out)"),
            "model": next(o for o in common if o.startswith("model.size=")).split("=")[1] + " LLaMA",
            "steps": int(next(o for o in common if o.startswith("trainer.max_steps=")).split("=")[1]),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() and args.config == "gpu" else "cpu",
            "threads": torch.get_num_threads(), "torch": torch.__version__, "common": common}
    verdict = verdicts(rows, args.config)
    out = Path(args.out or Path(__file__).resolve().parent / f"results_{args.config}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "reproduce.md").write_text(markdown(rows, meta, verdict))
    plot(rows, out / "reproduce.png")
    emit("reproduce", {**meta, "targets": verdict, "results": rows}, str(out / "reproduce.json"))


_STEP_KEYS = ("method.stage1_steps=", "method.warm_start_steps=", "method.reset_every=", "method.pretrain_steps=",
              "method.restart_warmup_steps=", "method.warmup_steps=", "method.check_interval=")


def _scale(override: str, f: float) -> str:
    for k in _STEP_KEYS:
        if override.startswith(k):
            return f"{k}{max(1, round(int(override[len(k):]) * f))}"
    return override


if __name__ == "__main__":
    main()
