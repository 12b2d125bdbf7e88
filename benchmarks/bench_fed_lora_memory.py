"""Memory of federated LoRA at scale: a GPT-2 small-sized model (124M parameters, random weights, saved by
``transformers``), 10 and 100 clients, every client training one round (``fed.local_steps``), on the local runtime
and on the default one (Flower's simulation on Ray). Reports the peak RSS and PSS of the whole process tree, sampled
every 0.2 s, and the adapters' bytes, to show that memory does not grow with the number of clients beyond their
adapters (each process holds one frozen base, shared by every model it builds).

    python benchmarks/bench_fed_lora_memory.py [--clients 10 100] [--runtimes local superlink] \\
        [--out benchmarks/results_cpu/fed_lora_memory.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import emit, environment, run_sampled  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def checkpoint(d: Path) -> Path:
    """A random GPT-2 small (124M) saved by transformers, with a small BPE trained here on the roles' text."""
    import torch
    import transformers as T

    from fedlowrank.data.text import train_bpe

    torch.manual_seed(0)
    T.GPT2LMHeadModel(T.GPT2Config()).save_pretrained(d)
    train_bpe([SHAKESPEARE.read_text()], 2048, path=d / "tokenizer.json")
    return d


def one(ckpt: Path, runtime: str, clients: int, tmp: Path) -> dict:
    out = tmp / f"{runtime}-{clients}"
    cmd = [sys.executable, "main.py", "experiment=fed_lora", f"model.pretrained={ckpt}", f"data.path={SHAKESPEARE}",
           f"fed.runtime={runtime}", f"fed.num_clients={clients}", "fed.fraction_train=1.0", "fed.rounds=1",
           "fed.local_steps=1", "fed.batch_size=4", "data.seq_len=64", "fed.min_partition_size=4",
           "fed.ranks=[64,32,16,16,8,8,4,4,4,4]", "fed.eval_budgets=false", f"out_dir={out}"]
    res = run_sampled(cmd, ROOT, timeout=3600)
    if res["returncode"]:
        sys.exit(f"{runtime} {clients} failed:\n{res['text'][-3000:]}")
    m = json.loads((out / "metrics.json").read_text())
    r1 = m["rounds_detail"][0]
    return {"runtime": runtime, "clients": clients, "wall_s": res["wall_s"], "peak_rss_mb": res["peak_rss_mb"],
            "peak_pss_mb": res["peak_pss_mb"], "clients_trained": r1["clients_ok"],
            "upload_mb": r1["upload_bytes"] / 1e6, "global_adapter_mb": m["global_model_bytes"] / 1e6,
            "base_params": m["dense_params"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--runtimes", nargs="+", default=["local", "superlink"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = checkpoint(Path(tmp) / "gpt2-small-random")
        rows = []
        for rt in args.runtimes:
            for n in args.clients:
                rows.append(one(ckpt, rt, n, Path(tmp)))
                print(json.dumps(rows[-1]), flush=True)  # each row as it comes
    for rt in args.runtimes:
        mine = sorted((r for r in rows if r["runtime"] == rt), key=lambda r: r["clients"])
        for r in mine[1:]:
            r["pss_growth_mb"] = r["peak_pss_mb"] - mine[0]["peak_pss_mb"]
            r["pss_ratio"] = r["peak_pss_mb"] / mine[0]["peak_pss_mb"]
            r["adapter_growth_mb"] = r["upload_mb"] - mine[0]["upload_mb"]  # the round's extra replies
            r["growth_over_adapters"] = r["pss_growth_mb"] / r["adapter_growth_mb"]
    emit("fed_lora_memory", {"date": time.strftime("%Y-%m-%d"), "total_wall_s": time.time() - t0,
                             "environment": environment("cpu"), "runs": rows}, args.out)


if __name__ == "__main__":
    main()
