"""The rank-vs-quality frontier of ``reproduce.py --sweep``: InRank at several thresholds and target sets against
fixed-rank runs matched in parameters, on the same tokens and text (see reproduce.py's docstring)."""
from __future__ import annotations

import re
import tempfile
from pathlib import Path

THRESHOLDS = (0.9, 0.95, 0.99)
TARGETS = {"MLP": "['mlp\\.']", "MLP+attn": "['attn\\.','mlp\\.']"}
EXTRA_RATIOS = (0.5,)  # one fixed-rank point above the matched ones, per target set
PAPER_THRESHOLD, PPL_TARGET = 0.9, 1.03


def _dir(tmp: Path, name: str) -> Path:
    return tmp / re.sub(r"[^A-Za-z0-9_.+-]", "_", name)


def fixed_params(ratio: float, targets: str, common: list[str], data: list[str]) -> int:
    """Parameters of the fixed-rank model at ``ratio`` (built, not trained)."""
    from fedlowrank.central import central_run_from_cfg
    from fedlowrank.central.model import build_lm
    from fedlowrank.federated.run_config import compose_cfg
    from fedlowrank.lowrank import count_params

    run = central_run_from_cfg(compose_cfg(["experiment=llama_full", "model.lowrank=fixed", f"model.ratio={ratio}",
                                            f"model.targets={targets}", *common, *data, "out_dir=unused"]))
    return count_params(build_lm(run, vocab_size=256))


def matched_ratio(params: int, targets: str, common: list[str], data: list[str]) -> float:
    """The fixed-rank ratio whose model has about ``params`` parameters (bisection; params grow with ratio)."""
    lo, hi = 1e-3, 1.0
    for _ in range(20):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fixed_params(mid, targets, common, data) < params else (lo, mid)
    return round(hi, 4)


def sweep(cfg: dict, common: list[str], data: list[str], run_one, evals: int, tmp: Path) -> dict[str, dict]:
    rows = {"full rank": run_one("full rank", cfg["runs"]["full rank"], common, data, tmp / "full", evals)}
    for tname, tov in TARGETS.items():
        inrank = []
        for thr in THRESHOLDS:
            name = f"InRank {tname} τ={thr}"
            rows[name] = run_one(name, [*cfg["runs"]["InRank"], f"model.targets={tov}", f"method.threshold={thr}"],
                                 common, data, _dir(tmp, name), evals)
            rows[name].update(kind="inrank", targets=tname, threshold=thr)
            inrank.append(rows[name]["params"])
        ratios = sorted({matched_ratio(p, tov, common, data) for p in inrank} | set(EXTRA_RATIOS))
        for r in ratios:
            name = f"fixed {tname} {r:.4g}"
            rows[name] = run_one(name, ["experiment=llama_full", "model.lowrank=fixed", f"model.ratio={r}",
                                        f"model.targets={tov}"], common, data, _dir(tmp, name), evals)
            rows[name].update(kind="fixed", targets=tname, ratio=r)
    base = rows["full rank"]
    for r in rows.values():
        r.pop("curve", None)
        r["held_out_ppl_ratio"], r["params_ratio"] = r["held_out_ppl"] / base["held_out_ppl"], r["params"] / base["params"]
        r["flops_ratio"] = r["model_flops"] / base["model_flops"]
    return rows


def verdicts(rows: dict[str, dict]) -> dict:
    fixed = [r for r in rows.values() if r.get("kind") == "fixed"]
    points = {}
    for name, r in rows.items():
        if r.get("kind") != "inrank":
            continue
        better = [f for f in fixed if f["params"] <= r["params"] and f["held_out_ppl"] < r["held_out_ppl"]]
        points[name] = {"on_or_below_frontier": not better,
                        "beaten_by": [f"fixed {f['targets']} {f['ratio']:.4g}" for f in better]}
    paper = rows[f"InRank MLP τ={PAPER_THRESHOLD}"]
    return {"frontier": points, "all_on_or_below": all(v["on_or_below_frontier"] for v in points.values()),
            "mlp_paper_threshold_ppl_ratio": paper["held_out_ppl_ratio"], "ppl_target": PPL_TARGET,
            "mlp_paper_threshold_met": paper["held_out_ppl_ratio"] <= PPL_TARGET}


def markdown(rows: dict[str, dict], v: dict, meta: dict) -> str:
    lines = [f"Held-out ppl after {meta['steps']} steps ({meta['model']}, {meta['text']}); ratios against full rank.",
             "", "| run | held-out ppl | × full | params × | training FLOPs × | frontier |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        f = v["frontier"].get(name)
        mark = "" if f is None else ("on/below" if f["on_or_below_frontier"] else "above: " + ", ".join(f["beaten_by"]))
        lines.append(f"| {name} | {r['held_out_ppl']:.3f} | {r['held_out_ppl_ratio']:.3f} | {r['params_ratio']:.3f} | "
                     f"{r['flops_ratio']:.3f} | {mark} |")
    lines += ["", f"MLP-only InRank at τ={PAPER_THRESHOLD}: {v['mlp_paper_threshold_ppl_ratio']:.3f}× full rank "
                  f"(target ≤ {PPL_TARGET}×: {'met' if v['mlp_paper_threshold_met'] else 'missed'})."]
    return "\n".join(lines) + "\n"


def plot(rows: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, label in ((axes[0], "params", "parameters"), (axes[1], "model_flops", "training FLOPs")):
        for tname, colour in zip(TARGETS, ("tab:blue", "tab:orange")):
            fx = sorted((r[key], r["held_out_ppl"]) for r in rows.values() if r.get("kind") == "fixed"
                        and r["targets"] == tname)
            ir = [(r[key], r["held_out_ppl"], r["threshold"]) for r in rows.values() if r.get("kind") == "inrank"
                  and r["targets"] == tname]
            if fx:
                ax.plot(*zip(*fx), "-o", color=colour, alpha=0.6, label=f"fixed rank ({tname})")
            for x, y, thr in ir:
                ax.plot(x, y, "*", color=colour, markersize=12)
                ax.annotate(f"τ={thr}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        full = rows["full rank"]
        ax.plot(full[key], full["held_out_ppl"], "ks", label="full rank")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out perplexity")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("InRank (stars) against fixed rank (lines)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def frontier_main(args, cfg: dict, common: list[str], data: list[str], run_one, emit) -> None:
    out = Path(args.out or Path(__file__).resolve().parent / f"results_{args.config}")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        rows = sweep(cfg, common, data, run_one, args.evals, Path(tmp))
    v = verdicts(rows)
    meta = {"config": args.config, "text": Path(args.text).name, "common": common,
            "model": next(o for o in common if o.startswith("model.size=")).split("=")[1] + " LLaMA",
            "steps": int(next(o for o in common if o.startswith("trainer.max_steps=")).split("=")[1])}
    (out / "frontier.md").write_text(markdown(rows, v, meta))
    plot(rows, out / "frontier.png")
    emit("frontier", {**meta, "verdicts": v, "results": rows}, str(out / "frontier.json"))
