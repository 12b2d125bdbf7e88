"""The federated engine against two plain baselines of the same task, interleaved in one invocation.

Contenders, each a fresh process (``python ...``) per repetition, in this order every repetition:

* ``default``: ``python main.py mode=federated`` (the default strategy, runtime and defences);
* ``fedavg``: the same with ``strategy=fedavg fed.clip_auto=null`` (dense FedAvg, nothing altered);
* ``default_local`` / ``fedavg_local``: the two above with ``fed.runtime=local`` (no Ray, no SuperLink);
* ``flower``: a plain Flower simulation (``FedAvg`` + a PyTorch ClientApp, ``engine_baselines.py``);
* ``loop``: a plain PyTorch FedAvg loop (``engine_baselines.py``).

The baselines get the project's own partitions (each client's training tensors after its held-out split),
test set, initial weights and seeding, exported before any timing; with clipping off, ``fedavg``,
``fedavg_local``, ``flower`` and ``loop`` must reach the same final accuracy at 4 clients (checked; at 100
clients Flower samples its own clients). Measured per process: whole wall (launch to exit), start-up (launch
to the start of round 1's training), steady round (median interval between round starts after round 1,
evaluation included) and the peak PSS of the whole process tree (``/proc/<pid>/smaps_rollup``, every 0.2 s).
Reports medians over repetitions, ratios against the baselines of the same invocation, as JSON + Markdown + PNG.

    python benchmarks/bench_fed_engine.py [--reps 3] [--populations 4:4 100:10] \
        [--out benchmarks/results_cpu/fed_engine.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
from _common import emit, environment, run_sampled  # noqa: E402

CONTENDERS = ("default", "fedavg", "default_local", "fedavg_local", "flower", "loop")
FEDAVG = ("strategy=fedavg", "fed.clip_auto=null")
SAME_ACCURACY = ("fedavg", "fedavg_local", "flower", "loop")  # at full participation


def project_overrides(n: int, per_round: int) -> list[str]:
    return [f"fed.num_clients={n}", f"fed.fraction_train={per_round / n}"] if n != 4 else []


def export_task(n: int, per_round: int, root: Path) -> None:
    """The project's fedavg task for ``n`` clients as spec.json + data.safetensors (see engine_baselines.py)."""
    from safetensors.torch import save_file

    from fedlowrank.config import federated_run_from_cfg
    from fedlowrank.federated.methods import fed_method
    from fedlowrank.federated.run_config import compose_cfg
    from fedlowrank.federated.task import fed_data

    run = federated_run_from_cfg(compose_cfg(["mode=federated", *FEDAVG, *project_overrides(n, per_round),
                                              f"out_dir={root / 'unused'}"]))
    fd, f = fed_data(run), run.fed
    t = {f"init.{k}": v.contiguous() for k, v in fed_method(run).initial_state().items()}
    for pid in range(n):
        x, y = fd.client_train(pid).tensors
        t[f"x.{pid}"], t[f"y.{pid}"] = x.contiguous(), y.contiguous()
    t["x.test"], t["y.test"] = (v.contiguous() for v in fd.test.tensors)
    layers = ("init.features.1.weight", "init.features.4.weight", "init.head.weight")  # the default MLP's
    sizes = [int(t[layers[0]].shape[1])] + [int(t[k].shape[0]) for k in layers]
    save_file(t, str(root / "data.safetensors"))
    spec = {"seed": run.seed, "num_clients": n, "per_round": per_round, "rounds": f.rounds, "lr": f.lr,
            "momentum": f.momentum, "batch_size": f.batch_size, "epochs": f.local_epochs, "sizes": sizes}
    if f.weight_decay or f.local_steps or f.prox_mu:
        raise SystemExit("the baselines implement plain SGD epochs only")
    (root / "spec.json").write_text(json.dumps(spec))


def command(name: str, n: int, per_round: int, root: Path, out: Path) -> list[str]:
    py = sys.executable
    if name in ("flower", "loop"):
        return [py, str(ROOT / "benchmarks" / "engine_baselines.py"), name, str(root)]
    extra = list(FEDAVG) if name.startswith("fedavg") else []
    extra += ["fed.runtime=local"] if name.endswith("_local") else []
    return [py, "main.py", "mode=federated", *extra, *project_overrides(n, per_round), f"out_dir={out}"]


def round_starts(name: str, root: Path, out: Path) -> tuple[list[float], float]:
    """Unix start time of every round's training (round 1 first) and the final global accuracy."""
    if name in ("flower", "loop"):
        rows = [json.loads(line) for line in (root / f"{name}_rounds.jsonl").read_text().splitlines()]
        (root / f"{name}_rounds.jsonl").unlink()
        return [r["next_started_at"] for r in rows[:-1]], rows[-1]["accuracy"]
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    starts = [r["train"]["started_at"] for r in rows if "train" in r]
    return starts, json.loads((out / "metrics.json").read_text())["final"]["global_accuracy"]


def measure(name: str, n: int, per_round: int, root: Path) -> dict:
    """One process of contender ``name``: wall, start-up, steady round, peak tree PSS, final accuracy."""
    out = root / f"run-{name}"
    r = run_sampled(command(name, n, per_round, root, out), ROOT)
    if r["returncode"] != 0:
        raise RuntimeError(f"{name} ({n} clients) exited {r['returncode']}:\n{r['text'][-3000:]}")
    wall, t0 = r["wall_s"], r["t_launch"]
    starts, acc = round_starts(name, root, out)
    gaps = [b - a for a, b in zip(starts[1:], starts[2:])]
    subprocess.run(["rm", "-rf", str(out)], check=False)
    steady = statistics.median(gaps)
    # start-up: launch to round 1's end, less one steady round (Ray's actors start at the first message)
    return {"wall_s": wall, "startup_s": starts[1] - t0 - steady, "steady_round_s": steady,
            "first_round_start_s": starts[0] - t0, "peak_pss_mb": r["peak_pss_mb"], "accuracy": acc,
            "round_starts_s": [s - t0 for s in starts]}


def population(n: int, per_round: int, reps: int) -> dict:
    """Every contender ``reps`` times, interleaved; medians and ratios."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        export_task(n, per_round, root)
        runs: dict[str, list[dict]] = {c: [] for c in CONTENDERS}
        for rep in range(reps):
            for c in CONTENDERS:
                runs[c].append(measure(c, n, per_round, root))
                print(f"[{n} clients, rep {rep}] {c}: {runs[c][-1]}", file=sys.stderr, flush=True)
    med = {c: {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "round_starts_s"}
           for c, rs in runs.items()}
    accs = {c: round(med[c]["accuracy"], 6) for c in SAME_ACCURACY}  # fp32 vs fp64 of the same count
    ratios = {c: {"steady_round_x_loop": m["steady_round_s"] / med["loop"]["steady_round_s"],
                  "steady_round_x_flower": m["steady_round_s"] / med["flower"]["steady_round_s"],
                  "wall_x_flower": m["wall_s"] / med["flower"]["wall_s"],
                  "pss_x_flower": m["peak_pss_mb"] / med["flower"]["peak_pss_mb"]} for c, m in med.items()}
    return {"clients": n, "per_round": per_round, "runs": runs, "median": med, "ratios": ratios,
            "same_accuracy": len(set(accs.values())) == 1, "accuracies": accs}


def markdown(pops: list[dict]) -> str:
    head = ("| clients (per round) | contender | whole s | start-up s | steady round s | × plain loop | "
            "× plain Flower | peak PSS MB | × Flower | accuracy |\n|---|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for p in pops:
        for c, m in p["median"].items():
            r = p["ratios"][c]
            rows.append(f"| {p['clients']} ({p['per_round']}) | {c} | {m['wall_s']:.1f} | {m['startup_s']:.1f} | "
                        f"{m['steady_round_s']:.3f} | {r['steady_round_x_loop']:.2f} | "
                        f"{r['steady_round_x_flower']:.2f} | {m['peak_pss_mb']:.0f} | {r['pss_x_flower']:.2f} | "
                        f"{m['accuracy']:.4f} |")
    return head + "\n".join(rows) + "\n"


def plot(pops: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, label in zip(axes, ("wall_s", "startup_s", "steady_round_s"),
                              ("whole process (s)", "start-up to round 1 (s)", "steady round (s)")):
        width = 0.8 / len(pops)
        for i, p in enumerate(pops):
            xs = [j + i * width for j in range(len(CONTENDERS))]
            ax.bar(xs, [p["median"][c][key] for c in CONTENDERS], width, label=f"{p['clients']} clients")
        ax.set_xticks([j + width * (len(pops) - 1) / 2 for j in range(len(CONTENDERS))], CONTENDERS, rotation=30)
        ax.set_title(label)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--populations", nargs="+", default=["4:4", "100:10"], help="clients:per_round")
    ap.add_argument("--out", default=None, help="JSON path; the .md table and .png go beside it")
    a = ap.parse_args()
    pops = [population(int(s.split(":")[0]), int(s.split(":")[1]), a.reps) for s in a.populations]
    table = markdown(pops)
    print(table, file=sys.stderr)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).with_suffix(".md").write_text(table)
        plot(pops, Path(a.out).with_suffix(".png"))
    emit("fed_engine", {"env": environment("cpu"), "reps": a.reps, "populations": pops}, a.out)
    bad = [p["clients"] for p in pops if p["clients"] == p["per_round"] and not p["same_accuracy"]]
    if bad:
        raise SystemExit(f"plain FedAvg contenders disagree on the final accuracy at {bad} clients: see accuracies")


if __name__ == "__main__":
    main()
