"""Federated LoRA fine-tuning with a different adapter rank per client: the heterogeneous rules side by side.

1. Pretrain: a byte-level BPE is trained (offline) on Python's docs text (``pydoc_data.topics``), a GPT-2 is
   pretrained on that text by central mode (``--size``, ``--pretrain-steps``) and exported as a Hugging Face
   directory (``python -m fedlowrank.export``).
2. Fine-tune federated on the Shakespeare roles (``experiment=fed_lora``: the 100 roles with the most text, 10
   sampled per round, the checkpoint's tokenizer), each client at FLoRA's rank layout ``[64,32,16,16,8,8,4,4,4,4]``
   (cycled over the clients), for every contender and ``--seeds``: homogeneous smallest rank and homogeneous largest
   rank (FedIT with one rank), ``fedit``, ``hetlora``, ``flexlora``, ``flora``, ``ffa``, ``product`` (and, when
   named in ``--contenders``, ``flora`` scaled as FLoRA's code scales, s = 2 for every rank). Runs go through
   the in-process loop (the apps' strategy and client code), one thread each, ``--jobs`` at once.
3. Reference: a LoRA at the largest rank trained centrally on the pooled training windows of the same clients, for
   as many example passes as the federated run made (rounds x 10% x local epochs).

Reported per contender (mean over seeds, 95 % t-intervals): the global model's held-out perplexity on every client's
own held-out windows (mean over the 100 clients, p90, worst; and over the clients that never trained), uploaded
bytes, and paired differences of the mean perplexity against homogeneous smallest rank.

    python benchmarks/bench_fed_lora.py [--seeds 0 1 2 3 4] [--rounds 10] [--jobs 2] \\
        [--out benchmarks/results_cpu/fed_lora.json]
    python benchmarks/bench_fed_lora.py --config gpu ...   # GPT-2 small (124M) on a GPU
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import ci95, emit, environment, paired  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
LAYOUT = "[64,32,16,16,8,8,4,4,4,4]"  # FLoRA's heterogeneous ranks
CONTENDERS = {
    "homogeneous smallest (r=4)": ["strategy=fedit", "fed.ranks=[4]"],
    "homogeneous largest (r=64)": ["strategy=fedit", "fed.ranks=[64]"],
    **{rule: [f"strategy={rule}", f"fed.ranks={LAYOUT}"] for rule in
       ("fedit", "hetlora", "flexlora", "flora", "ffa", "product")},
    # FLoRA as its code scales client adapters (lora_alpha = 2r: s = 2 whatever the rank); not in the default list
    "flora (s=2, as its code)": ["strategy=flora", f"fed.ranks={LAYOUT}", "method.scaling=fixed", "method.alpha=2"],
}
DEFAULT_CONTENDERS = [n for n in CONTENDERS if "as its code" not in n]
BASELINE = "homogeneous smallest (r=4)"
CONFIGS = {  # model size, pretraining steps, device, vocabulary of the BPE
    "cpu": {"size": "mini", "steps": 1500, "device": "cpu", "vocab": 1024, "seq_len": 64},
    "gpu": {"size": "small", "steps": 3000, "device": "cuda", "vocab": 8192, "seq_len": 128},
}


def pretrain(tmp: Path, cfg: dict) -> Path:
    """A BPE on the docs text, a GPT-2 pretrained on it by central mode, exported; returns the HF directory."""
    from fedlowrank.data.text import pydoc_text, train_bpe

    train_bpe([pydoc_text()], cfg["vocab"], ("<|endoftext|>",), tmp / "tokenizer.json")
    run = [sys.executable, "main.py", "mode=central", "model=gpt2", f"model.size={cfg['size']}", "data=pydoc",
           f"data.tokenizer={tmp / 'tokenizer.json'}", f"trainer.max_steps={cfg['steps']}", "trainer.batch_size=16",
           "trainer.block_size=128", f"trainer.device={cfg['device']}", "trainer.progress=false",
           "trainer.eval_interval=500", f"out_dir={tmp / 'pretrain'}"]
    for cmd in (run, [sys.executable, "-m", "fedlowrank.export", str(tmp / "pretrain"), str(tmp / "hf")]):
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{' '.join(cmd[:4])} failed:\n{proc.stderr[-3000:]}")
    return tmp / "hf"


def _run(hf: Path, overrides: list[str], seed: int, out: str):
    from fedlowrank.config import federated_run_from_cfg
    from fedlowrank.federated.run_config import compose_cfg

    return federated_run_from_cfg(compose_cfg(["experiment=fed_lora", f"model.pretrained={hf}", "fed.num_clients=100",
                                               "fed.fraction_train=0.1", f"data.path={SHAKESPEARE}", f"seed={seed}",
                                               f"out_dir={out}", *overrides]))


def one_run(job: tuple) -> dict:
    """Held-out perplexity of the global model on every client's split after the run, and its uploaded bytes."""
    name, overrides, seed, hf, out = job
    import logging

    import torch

    from fedlowrank.federated.methods import fed_method
    from fedlowrank.federated.report import personalized_eval
    from fedlowrank.federated.task import fed_data
    from fedlowrank.runtime.inprocess import InProcessGrid, make_strategy

    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    run = _run(hf, overrides, seed, out)
    st, grid, t0 = make_strategy(run), InProcessGrid(run), time.perf_counter()
    for rnd in range(1, run.fed.rounds + 1):
        st.aggregate_train(rnd, grid.send_and_receive(list(st.configure_train(rnd, None, None, grid))))
    trained = {c["pid"] for h in st.history for c in h["clients"]}
    pe = personalized_eval(run, fed_method(run), st.global_state, fed_data(run), trained)
    return {"name": name, "seed": seed, "perplexity": pe["perplexity"], "wall_s": time.perf_counter() - t0,
            "upload_bytes": sum(h["upload_bytes"] for h in st.history),
            "honest_clipped": sum(1 for h in st.history for c in h["clients"] if c.get("clipped_excess")),
            "client_rounds": sum(len(h["clients"]) for h in st.history)}


def central_reference(job: tuple) -> dict:
    """A LoRA at rank 64 trained on the pooled training windows of the 100 clients, as many passes as the federated
    runs made; scored like them."""
    _, overrides, seed, hf, out = job
    import logging

    import numpy as np
    import torch

    from fedlowrank.federated.client import compute_device, model_from_state
    from fedlowrank.federated.methods import fed_method
    from fedlowrank.federated.report import personalized_eval
    from fedlowrank.federated.task import fed_data
    from fedlowrank.training.batches import batches
    from fedlowrank.training.loop import train_classifier

    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    run = _run(hf, overrides, seed, out)
    method, fd = fed_method(run), fed_data(run)
    torch.manual_seed(seed)
    device = compute_device(run)  # fed.device: cuda in the GPU config, as the federated contenders
    model = model_from_state(run, method.initial_state()).to(device)
    pool = torch.as_tensor(np.concatenate(fd.train_parts), dtype=torch.long)
    ds = torch.utils.data.TensorDataset(fd.x[pool], fd.y[pool])
    epochs = run.fed.rounds * run.fed.fraction_train * run.fed.local_epochs
    params = [p for p in model.parameters() if p.requires_grad]
    steps = int(round(epochs * len(ds) / run.fed.batch_size))
    start = personalized_eval(run, method, method.initial_state(), fd, set())  # B = 0: the pretrained model
    train_classifier(model, batches(ds, run.fed.batch_size, shuffle=True), method.local_optimizer(params),
                     epochs=int(np.ceil(epochs)), max_steps=steps, device=device)
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items() if k.endswith((".adapter.U", ".adapter.V"))}
    pe = personalized_eval(run, method, state, fd, set())
    return [{"name": "pretrained, not fine-tuned", "seed": seed, "perplexity": start["perplexity"], "upload_bytes": 0},
            {"name": "central LoRA (r=64, pooled data)", "seed": seed, "perplexity": pe["perplexity"],
             "upload_bytes": 0, "steps": steps}]


def summarise(runs: list[dict]) -> dict:
    """Per contender: mean and 95 % CI of the clients' mean / p90 / worst held-out perplexity (and of the clients
    that never trained), uploaded MB, and the paired difference of the mean perplexity against the baseline."""
    base = {r["seed"]: r for r in runs if r["name"] == BASELINE}
    out = {}
    for name in dict.fromkeys(r["name"] for r in runs):
        rs = [r for r in runs if r["name"] == name]
        row = {}
        for group in ("all", "never_trained"):
            for q in ("mean", "p90", "worst"):
                xs = [r["perplexity"][group][q] for r in rs if group in r["perplexity"]]
                if xs:
                    row[f"{group}_{q}"] = statistics.fmean(xs)
                    row[f"{group}_{q}_ci95"] = ci95(xs)
        row["upload_mb"] = statistics.fmean(r["upload_bytes"] for r in rs) / 1e6
        row["per_seed_mean_ppl"] = [r["perplexity"]["all"]["mean"] for r in rs]
        if "honest_clipped" in rs[0]:
            row["clipped_updates"] = f"{sum(r['honest_clipped'] for r in rs)} of {sum(r['client_rounds'] for r in rs)}"
        if name != BASELINE and base:
            row["mean_ppl_diff_vs_baseline"] = paired([r["perplexity"]["all"]["mean"] - base[r["seed"]]["perplexity"]
                                                       ["all"]["mean"] for r in rs if r["seed"] in base])
        out[name] = row
    return out


def verdict(res: dict) -> dict:
    """Which heterogeneous rule has the lowest mean perplexity, by how much against the baseline (paired), and
    its uploaded bytes as a share of homogeneous largest rank's."""
    rules = [n for n in res if n in ("fedit", "hetlora", "flexlora", "flora", "ffa", "product")]
    best = min(rules, key=lambda n: res[n]["all_mean"])
    largest = next(n for n in res if n.startswith("homogeneous largest"))
    d = res[best]["mean_ppl_diff_vs_baseline"]
    return {"best_rule": best, "best_mean_ppl": res[best]["all_mean"], "baseline_mean_ppl": res[BASELINE]["all_mean"],
            "diff_vs_baseline": d, "beats_baseline_significantly": bool(d["significant"] and d["mean"] < 0),
            "bytes_share_of_homogeneous_largest": res[best]["upload_mb"] / res[largest]["upload_mb"],
            "largest_mean_ppl": res[largest]["all_mean"]}


def table(res: dict) -> str:
    """Markdown table of the summary."""
    head = ("| contender | mean ppl [95 % CI] | p90 | worst | never-trained mean | upload MB | Δ mean ppl vs r=4 "
            "[95 % CI] | clipped updates |\n|---|---|---|---|---|---|---|---|\n")
    rows = []
    for n, r in res.items():
        ci = r.get("all_mean_ci95") or [float("nan")] * 2
        d = r.get("mean_ppl_diff_vs_baseline")
        dtxt = f"{d['mean']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]" if d and d["ci95"] else "—"
        rows.append(f"| {n} | {r['all_mean']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}] | {r['all_p90']:.2f} | "
                    f"{r['all_worst']:.2f} | {r.get('never_trained_mean', float('nan')):.2f} | {r['upload_mb']:.2f} | "
                    f"{dtxt} | {r.get('clipped_updates', '—')} |")
    return head + "\n".join(rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=list(CONFIGS), default="cpu")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--local-epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--pretrain-steps", type=int, default=None)
    ap.add_argument("--contenders", nargs="+", default=DEFAULT_CONTENDERS, choices=list(CONTENDERS))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--pretrained", default=None, help="an HF directory from an earlier invocation: no pretraining")
    args = ap.parse_args()
    if not SHAKESPEARE.is_file():
        sys.exit(f"needs {SHAKESPEARE}")
    cfg = {**CONFIGS[args.config], **({"steps": args.pretrain_steps} if args.pretrain_steps else {})}
    t0 = time.time()
    common = [f"fed.rounds={args.rounds}", f"fed.local_epochs={args.local_epochs}", f"fed.lr={args.lr}",
              "fed.min_partition_size=4",
              f"data.seq_len={cfg['seq_len']}", f"fed.device={cfg['device']}"]
    with tempfile.TemporaryDirectory() as tmp:
        hf = Path(args.pretrained) if args.pretrained else pretrain(Path(tmp), cfg)
        t_pre = time.time() - t0
        jobs = [(n, [*CONTENDERS[n], *common], s, hf, f"{tmp}/{i}")
                for i, (n, s) in enumerate((n, s) for n in args.contenders for s in args.seeds)]
        ref = [("central", [f"fed.ranks={LAYOUT}", "strategy=fedit", *common], s, hf, f"{tmp}/ref{s}")
               for s in args.seeds]
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            runs = pool.map(one_run, jobs, chunksize=1)
            runs += [r for pair in pool.map(central_reference, ref, chunksize=1) for r in pair]
    res = summarise(runs)
    meta = {"config": args.config, **cfg, "rounds": args.rounds, "local_epochs": args.local_epochs, "lr": args.lr,
            "seeds": args.seeds, "layout": LAYOUT, "clients": 100, "per_round": 10, "jobs": args.jobs,
            "date": time.strftime("%Y-%m-%d"), "pretrain_s": t_pre, "total_wall_s": time.time() - t0}
    payload = {**meta, "environment": environment(cfg["device"]), "contenders": res,
               "verdict": verdict(res) if {BASELINE, "homogeneous largest (r=64)"} <= set(res) else None, "runs": runs}
    emit("fed_lora", payload, args.out)
    if args.out:
        Path(args.out).with_suffix(".md").write_text(table(res))
    print(table(res))


if __name__ == "__main__":
    main()
