"""ReLoRA vs full-rank (optimizer-state bytes, trainable params, tokens/s, perplexity) and
WeLore perplexity vs reduction (before/after LRC fine-tuning) on the embedded corpus.
Prints JSON with ratios against the full-rank run and saves a PNG plot.

    python benchmarks/bench_relora_welore.py [--size mini] [--steps 300] [--png out.png]
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import emit  # noqa: E402

from fedlowrank.central import central_run_from_cfg, launch  # noqa: E402
from fedlowrank.central.dist import load_weights  # noqa: E402
from fedlowrank.central.model import build_lm  # noqa: E402
from fedlowrank.data.text import get_batch, load_text_data  # noqa: E402
from fedlowrank.federated.run_config import compose_cfg  # noqa: E402
from fedlowrank.methods.welore import WeLoreConfig, welore_compress  # noqa: E402


@torch.no_grad()
def eval_ppl(model, data, block: int, batch: int, iters: int, device) -> float:
    model.eval().to(device)
    losses = []
    for i in range(iters):
        x, y = get_batch(data.val, batch, block, 1, i)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x.to(device))
        losses.append(F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten()).item())
    return math.exp(sum(losses) / len(losses))


def main() -> None:
    gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="llama")
    ap.add_argument("--size", default="130m" if gpu else "mini")
    ap.add_argument("--steps", type=int, default=600 if gpu else 300)
    ap.add_argument("--finetune", type=int, default=100 if gpu else 50)
    ap.add_argument("--block", type=int, default=256 if gpu else 64)
    ap.add_argument("--batch", type=int, default=32 if gpu else 8)
    ap.add_argument("--lr", type=float, default=1e-3 if gpu else 3e-3)
    ap.add_argument("--rank", type=int, default=64 if gpu else 8)
    ap.add_argument("--reductions", type=float, nargs="+", default=[0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8])
    ap.add_argument("--png", default=os.path.join(os.environ.get("BENCH_OUT", "."), "welore_ppl_vs_reduction.png"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    dev = torch.device("cuda" if gpu else "cpu")
    base = [f"model={args.arch}", f"model.size={args.size}", f"trainer.block_size={args.block}",
            f"trainer.batch_size={args.batch}", f"trainer.lr={args.lr}", "trainer.eval_iters=20",
            "trainer.progress=false", f"trainer.ckpt_interval={10**9}", "mode=central"]
    with tempfile.TemporaryDirectory() as d:
        # --- ReLoRA vs full rank, same config and steps
        rows = {}
        for name, extra in (("full", ["method=none"]),
                            ("relora", ["method=relora", f"method.r={args.rank}", f"method.alpha={2 * args.rank}",
                                        f"method.warm_start_steps={args.steps // 6}",
                                        f"method.reset_every={args.steps // 6}",
                                        f"method.restart_warmup_steps={max(1, args.steps // 60)}"])):
            res = launch(central_run_from_cfg(compose_cfg(
                base + extra + [f"trainer.max_steps={args.steps}", f"trainer.eval_interval={args.steps}",
                                f"trainer.log_interval={max(1, args.steps // 10)}", f"out_dir={d}/{name}"])))
            rows[name] = {k: res[k] for k in ("params", "trainable_params", "optimizer_state_bytes", "tokens_per_s")}
            rows[name]["eval_ppl"] = res["final_eval"]["ppl"]
        for r in rows.values():
            for k in ("optimizer_state_bytes", "tokens_per_s", "eval_ppl", "trainable_params"):
                r[f"{k}_ratio"] = r[k] / rows["full"][k]
        # --- WeLore: compress the full-rank model at several reductions
        data = load_text_data("pydoc")
        run_full = central_run_from_cfg(compose_cfg(base + ["method=none", f"out_dir={d}/x"]))
        ckpt = Path(d) / "full" / "checkpoints" / "last"
        curve = []
        for red in args.reductions:
            model = build_lm(run_full, data.vocab_size)
            load_weights(model, ckpt)
            entry = {"target_reduction": red}
            if red > 0:
                plan = welore_compress(model, WeLoreConfig(target_reduction=red))
                entry.update(achieved=plan.reduction, lrc=len(plan.ranks), n_lrc=len(plan.dense))
            entry["ppl_compressed"] = eval_ppl(model, data, args.block, args.batch, 20, dev)
            if red > 0 and args.finetune > 0:
                res = launch(central_run_from_cfg(compose_cfg(
                    base + ["method=welore", f"method.target_reduction={red}", "method.pretrain_steps=0",
                            f"method.from_ckpt={ckpt}", f"trainer.max_steps={args.finetune}",
                            f"trainer.eval_interval={args.finetune}", f"trainer.warmup_steps={args.finetune // 10}",
                            f"trainer.lr={args.lr / 3}", f"out_dir={d}/w{red}"])))
                entry["ppl_finetuned"] = res["final_eval"]["ppl"]
                entry["trainable_params"] = res["trainable_params"]
            curve.append(entry)
    dense_ppl = curve[0]["ppl_compressed"]
    for e in curve:
        e["ppl_ratio_vs_dense"] = e["ppl_compressed"] / dense_ppl
    _plot(curve, args.png)
    emit("relora_welore", {"device": str(dev), "arch": args.arch, "size": args.size, "steps": args.steps,
                           "relora_vs_full": rows, "welore_curve": curve, "png": args.png})


def _plot(curve: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [e["target_reduction"] for e in curve]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(xs, [e["ppl_compressed"] for e in curve], "o-", label="compressed (no fine-tune)")
    ft = [(e["target_reduction"], e["ppl_finetuned"]) for e in curve if "ppl_finetuned" in e]
    if ft:
        ax.plot([x for x, _ in ft], [y for _, y in ft], "s-", label="after LRC fine-tuning")
    ax.axhline(curve[0]["ppl_compressed"], color="gray", ls="--", lw=1, label="dense")
    ax.set_xlabel("WeLore parameter reduction (target matrices)")
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
