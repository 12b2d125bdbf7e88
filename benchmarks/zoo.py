"""Low-rank training from scratch across the model zoo, in central mode: the table of Sherrylife/Low-rank_Model_Training
(full rank against low rank 0.2, with and without Frobenius decay, and a hybrid), on the same data and schedule.

For every model and variant, ``--seeds`` runs of ``python main.py mode=central`` (in-process, each in a worker
process with one thread; ``--jobs`` at once) report the held-out metric, parameters, size (MB), forward FLOPs (M,
one image or one sequence) and wall time. Ratios and differences are against full rank of the same seed, from
the same invocation; differences carry a 95 % t-interval over the paired seeds.

* ``--config cpu`` (default, about 40 min on 2 cores): MLP, CNN and small VGG/ResNet/ViT on sklearn digits (held-out
  20 %), the character LSTM on tinyshakespeare (held-out last 10 %), the character Transformer on the Python docs
  (held-out last 10 %).
* ``--config gpu``: the seed's CIFAR-10 set (ResNet-18, VGG-11, VGG-16, ViT) with its optimisers and schedules;
  needs a GPU and CIFAR-10 (downloads through torchvision).

    python benchmarks/zoo.py [--config cpu] [--seeds 0 1 2] [--jobs 2] [--out benchmarks/results_cpu/zoo.json]

Writes the JSON and a Markdown table beside it (``zoo.md``).
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import emit, environment, paired  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


@dataclass
class Row:
    """One model of the table: its overrides (model, data, schedule) and the variants it runs."""

    dataset: str
    model: str
    overrides: list[str]
    metric: str = "accuracy"  # accuracy (higher is better) | ppl (lower is better)
    fd: float = 1e-4  # Frobenius decay coefficient of the low rank + FD variant
    dense_first: int = 0  # hybrid variant: this many first layers dense (0: no hybrid variant)
    variants: list[str] = field(default_factory=lambda: ["full", "low", "low_fd"])


DIGITS = ["data=digits", "trainer.batch_size=64", "trainer.max_steps=600", "trainer.warmup_steps=30",
          "trainer.lr=3e-3", "trainer.weight_decay=0.05"]
CPU_ROWS = [
    Row("digits", "MLP", ["model=mlp", *DIGITS], dense_first=1),
    Row("digits", "CNN", ["model=cnn", *DIGITS], dense_first=1),
    Row("digits", "VGG (small)", ["model=vgg", *DIGITS], dense_first=2),
    Row("digits", "ResNet (small)", ["model=resnet", *DIGITS], dense_first=2),
    Row("digits", "ViT (small)", ["model=vit", *DIGITS], dense_first=2),
    # the input projection W_ih (8 -> 4 x 256) stays dense: at ratio 0.2 it would pass the 8-wide embedding through
    # rank 2, and it holds 3 % of the weights (hybrid, as Pufferfish keeps layers where low rank saves little)
    Row("tinyshakespeare", "LSTM", ["model=lstm", "data=shakespeare", f"data.path={SHAKESPEARE}", "model.hidden=256",
                                    "model.emb_dim=8", "model.skip=[emb,head,W_ih]", "trainer.block_size=80",
                                    "trainer.batch_size=32", "trainer.max_steps=700", "trainer.lr=5e-3",
                                    "trainer.weight_decay=0"], variants=["full", "low"]),
    Row("python docs", "Transformer", ["model=char_transformer", "data=pydoc", "data.max_chars=400000",
                                       "trainer.block_size=64", "trainer.batch_size=16", "trainer.max_steps=700",
                                       "trainer.lr=3e-3"], metric="ppl"),
]
CIFAR = ["data=cifar10", "trainer.batch_size=128", "trainer.optimizer=sgd", "trainer.weight_decay=5e-4",
         "trainer.max_steps=78200", "trainer.warmup_steps=0", "trainer.min_lr_ratio=0", "trainer.grad_clip=0",
         "trainer.eval_interval=3910", "trainer.ckpt_interval=3910"]  # 200 epochs of 391 steps, cosine, as the seed
GPU_ROWS = [
    Row("CIFAR-10", "ResNet18", ["model=resnet18", *CIFAR, "trainer.lr=0.1"], fd=1e-4, dense_first=5),
    Row("CIFAR-10", "VGG16", ["model=vgg16", *CIFAR, "trainer.lr=0.01"], fd=1e-2, dense_first=4),
    Row("CIFAR-10", "VGG11", ["model=vgg11", *CIFAR, "trainer.lr=0.01"], fd=1e-2, dense_first=2),
    Row("CIFAR-10", "ViT", ["model=vit_cifar", *CIFAR[:-6], "trainer.max_steps=195500", "trainer.warmup_steps=0",
                            "trainer.optimizer=adamw", "trainer.lr=1e-3", "trainer.eval_interval=3910",
                            "trainer.ckpt_interval=3910"], fd=1e-6),
]


def variant_overrides(row: Row, variant: str, ratio: float) -> list[str]:
    low = ["model.lowrank=fixed", f"model.ratio={ratio}"]
    return {"full": [], "low": low, "low_fd": [*low, f"trainer.frob_decay={row.fd}"],
            "hybrid": [*low, f"model.dense_first={row.dense_first}"]}[variant]


def one_run(job: tuple[list[str], str, int, str]) -> dict:
    """A central run in this worker process (one thread): its summary's figures and the wall time."""
    overrides, device, seed, out = job
    import torch
    from hydra import compose, initialize_config_dir

    from fedlowrank.central import launch
    from fedlowrank.config.central import central_run_from_cfg

    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["mode=central", *overrides, f"seed={seed}", f"trainer.device={device}",
                                            "trainer.progress=false", "trainer.eval_full=true", f"out_dir={out}"])
    t0 = time.perf_counter()
    s = launch(central_run_from_cfg(cfg))
    ev = s["final_eval"]
    return {"seed": seed, "accuracy": ev["accuracy"], "loss": ev["loss"], "ppl": ev.get("ppl"),
            "params": s["params"], "size_mb": s["size_mb"], "forward_mflops": s["forward_flops"] / 1e6,
            "train_time_s": s["train_time_s"], "wall_s": time.perf_counter() - t0}


def summarize(row: Row, runs: dict[str, list[dict]]) -> dict:
    """Per variant: mean/sd of the metric, size, FLOPs, wall time; ratios and paired differences against full."""
    key = row.metric
    full = {r["seed"]: r for r in runs["full"]}
    out = {}
    for v, rs in runs.items():
        vals = [r[key] for r in rs]
        scale = 100.0 if key == "accuracy" else 1.0  # accuracy differences in points
        d = {"metric": key, "mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
             "per_seed": vals, "params": rs[0]["params"], "size_mb": rs[0]["size_mb"],
             "forward_mflops": rs[0]["forward_mflops"], "wall_s": statistics.fmean(r["wall_s"] for r in rs),
             "train_time_s": statistics.fmean(r["train_time_s"] for r in rs)}
        if v != "full":
            f0 = runs["full"][0]
            d.update(size_ratio=d["size_mb"] / f0["size_mb"], flops_ratio=d["forward_mflops"] / f0["forward_mflops"],
                     wall_ratio=d["wall_s"] / statistics.fmean(r["wall_s"] for r in runs["full"]),
                     diff_vs_full=paired([scale * (r[key] - full[r["seed"]][key]) for r in rs]))
        out[v] = d
    if "low_fd" in runs:
        low = {r["seed"]: r for r in runs["low"]}
        sign = 1.0 if key == "accuracy" else -1.0  # positive: FD better
        out["low_fd"]["fd_gain_vs_low"] = paired([sign * (100.0 if key == "accuracy" else 1.0) *
                                                  (r[key] - low[r["seed"]][key]) for r in runs["low_fd"]])
    return out


def targets(table: dict) -> dict:
    """The CPU targets: low rank within 2 pt of full for the CNN and ResNet, within 1 pt for the LSTM (means over
    seeds); FD no worse than low rank without it (mean gain >= 0, or its interval reaches 0)."""
    res = {}
    for model, tol in (("CNN", 2.0), ("ResNet (small)", 2.0), ("LSTM", 1.0)):
        if model in table:
            d = table[model]["variants"]["low"]["diff_vs_full"]["mean"]
            res[f"{model}: low rank within {tol} pt"] = {"diff_pt": d, "met": d >= -tol}
    for model, t in table.items():
        gain = t["variants"].get("low_fd", {}).get("fd_gain_vs_low")
        if gain:
            ci = gain["ci95"]
            res[f"{model}: FD no worse"] = {"gain": gain["mean"], "ci95": ci,
                                            "met": gain["mean"] >= 0 or (ci is not None and ci[1] >= 0)}
    return res


def markdown(table: dict, meta: dict) -> str:
    """The table in the seed's layout, with ratios against full rank."""
    lines = [f"Generated by `benchmarks/zoo.py --config {meta['config']}` ({meta['date']}, seeds {meta['seeds']}, "
             f"{meta['device']}); metric mean ± sd over seeds, differences against full rank of the same seed "
             "(paired, 95 % CI).", "",
             "| dataset | model | variant | metric | Δ vs full | size MB | FLOPs M | wall s "
             "| size / FLOPs / wall ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for model, t in table.items():
        for v, d in t["variants"].items():
            acc = d["metric"] == "accuracy"
            val = f"{100 * d['mean']:.2f} ± {100 * d['sd']:.2f} %" if acc else f"{d['mean']:.3f} ± {d['sd']:.3f} ppl"
            diff, ratios = "—", "1 / 1 / 1"
            if "diff_vs_full" in d:
                dv = d["diff_vs_full"]
                ci = dv["ci95"]
                diff = f"{dv['mean']:+.2f}{' pt' if acc else ''}" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "")
                ratios = f"{d['size_ratio']:.3f} / {d['flops_ratio']:.3f} / {d['wall_ratio']:.2f}"
            lines.append(f"| {t['dataset']} | {model} | {v} | {val} | {diff} | {d['size_mb']:.3f} | "
                         f"{d['forward_mflops']:.3f} | {d['wall_s']:.1f} | {ratios} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--models", nargs="*", default=None, help="only these rows (by model name)")
    ap.add_argument("--hybrid", action="store_true", help="also the hybrid variant (model.dense_first)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = [r for r in (CPU_ROWS if args.config == "cpu" else GPU_ROWS) if not args.models or r.model in args.models]
    device = "cpu" if args.config == "cpu" else "cuda"
    if args.config == "cpu" and any(r.model == "LSTM" for r in rows) and not SHAKESPEARE.is_file():
        sys.exit(f"the LSTM row reads {SHAKESPEARE}; pass --models without LSTM to skip it")
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        jobs, keys = [], []
        for row in rows:
            for v in row.variants + (["hybrid"] if args.hybrid and row.dense_first else []):
                for seed in args.seeds:
                    jobs.append((row.overrides + variant_overrides(row, v, args.ratio), device, seed,
                                 f"{tmp}/{len(jobs)}"))
                    keys.append((row.model, v))
        with mp.get_context("spawn").Pool(args.jobs if device == "cpu" else 1) as pool:
            results = pool.map(one_run, jobs, chunksize=1)
    table: dict = {}
    for row in rows:
        runs: dict[str, list[dict]] = {}
        for (model, v), r in zip(keys, results):
            if model == row.model:
                runs.setdefault(v, []).append(r)
        table[row.model] = {"dataset": row.dataset, "overrides": row.overrides, "fd": row.fd,
                            "dense_first": row.dense_first, "variants": summarize(row, runs)}
    meta = {"config": args.config, "seeds": args.seeds, "ratio": args.ratio, "jobs": args.jobs,
            "date": time.strftime("%Y-%m-%d"), "device": device, "total_wall_s": time.time() - t0}
    emit("zoo", {**meta, "environment": environment(device), "targets": targets(table), "table": table}, args.out)
    if args.out:
        Path(args.out).with_suffix(".md").write_text(markdown(table, meta))


if __name__ == "__main__":
    main()
