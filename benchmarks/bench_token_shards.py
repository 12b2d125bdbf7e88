"""Memory of training from token shards (data=tokens, memory-mapped) against the in-RAM path (data=textfile), at
1x and 10x the corpus: peak RSS of a short tiny-LLaMA run in a fresh process per cell, ratios 10x / 1x from this
run. The corpus is the embedded Python docs text repeated to the size asked for (offline).

    python benchmarks/bench_token_shards.py [--base-mb 5] [--steps 30]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import emit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
from fedlowrank.central import central_run_from_cfg, launch
from fedlowrank.federated.run_config import compose_cfg
t0 = time.perf_counter()
res = launch(central_run_from_cfg(compose_cfg({overrides!r})))
print(json.dumps({{"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "wall_s": time.perf_counter() - t0, "ppl": res["final_eval"]["ppl"]}}))
"""


def corpus(path: Path, mb: float) -> Path:
    from fedlowrank.data.text import pydoc_text

    text = pydoc_text()
    with path.open("w") as f:
        written = 0
        while written < mb * 2**20:
            f.write(text)
            written += len(text.encode())
    return path


def measure(overrides: list[str]) -> dict:
    code = CHILD.format(root=str(ROOT), overrides=overrides)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=1800)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-mb", type=float, default=5.0)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results_cpu" / "token_shards.json"))
    args = ap.parse_args()
    common = ["experiment=llama_full", f"trainer.max_steps={args.steps}", "trainer.device=cpu",
              "trainer.progress=false", f"trainer.eval_interval={args.steps}", "trainer.eval_iters=4",
              "trainer.ckpt_interval=1000000000"]
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        for scale in (1, 10):
            text = corpus(t / f"c{scale}.txt", args.base_mb * scale)
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "fedlowrank.data.prepare", "--out", str(t / f"s{scale}"),
                            "--workers", "2", str(text)], cwd=ROOT, check=True, capture_output=True, timeout=3600)
            prep_s = time.perf_counter() - t0
            rows[f"tokens {scale}x"] = {**measure([*common, "data=tokens", f"data.dir={t / f's{scale}'}",
                                                   f"out_dir={t / f'o{scale}'}"]), "prepare_s": prep_s}
            rows[f"in RAM {scale}x"] = measure([*common, "data=textfile", f"data.train_path={text}",
                                                f"out_dir={t / f'r{scale}'}"])
            rows[f"tokens {scale}x"]["corpus_mb"] = rows[f"in RAM {scale}x"]["corpus_mb"] = text.stat().st_size / 2**20
    ratios = {src: rows[f"{src} 10x"]["peak_rss_mb"] / rows[f"{src} 1x"]["peak_rss_mb"] for src in ("tokens", "in RAM")}
    emit("token_shards", {"base_mb": args.base_mb, "steps": args.steps, "rows": rows,
                          "peak_rss_ratio_10x_over_1x": ratios}, args.out)


if __name__ == "__main__":
    main()
