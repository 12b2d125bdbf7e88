"""Compare ``strategy=flexlora`` with FederatedScope's own FlexLoRA code on identical inputs.

Reads the reference's ``fed_utils/model_aggregation.py`` (``FlexLoRA``: the weighted sum of the clients'
(alpha/r)·B·A) and ``fed_utils/adaptive_peft.py`` (``distribute_weight_fast``: each client's top-r factors) from a
checkout of alibaba/FederatedScope, branch ``FlexLoRA`` (not vendored here), runs them on random client adapters of
ranks 2/4/8 written in the reference's file layout, and runs :mod:`fedlowrank.federated.lora_rules` on the same
tensors. Prints the largest differences of the aggregated ΔW and of every client's downloaded (alpha/r)·B·A.

    git clone -b FlexLoRA https://github.com/alibaba/FederatedScope fs
    python scripts/compare_flexlora_reference.py fs
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import types
from pathlib import Path

import torch

from fedlowrank.federated import lora_rules

ALPHA = 16.0  # the reference hard-codes merge_rate = 16 / rank
OUT, IN, RANKS, SIZES = 48, 40, [2, 4, 8], [120, 60, 20]


def _module(path: Path, name: str):
    sys.modules.setdefault("peft", types.ModuleType("peft"))  # imported at the top of adaptive_peft, not used here
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkout", type=Path, help="a checkout of alibaba/FederatedScope at branch FlexLoRA")
    args = ap.parse_args(argv)
    agg = _module(args.checkout / "fed_utils" / "model_aggregation.py", "fs_model_aggregation")
    peft_utils = _module(args.checkout / "fed_utils" / "adaptive_peft.py", "fs_adaptive_peft")
    g = torch.Generator().manual_seed(0)
    key = "base_model.model.layer.lora_A.local.weight"
    replies = []
    with tempfile.TemporaryDirectory() as d:
        for k, r in enumerate(RANKS):
            B, A = torch.randn(OUT, r, generator=g), torch.randn(r, IN, generator=g)
            replies.append({"l.adapter.U": B.double(), "l.adapter.V": A.double()})
            f = Path(d) / str(k) / "local_output_epoch_0" / "pytorch_model.bin"
            f.parent.mkdir(parents=True)
            torch.save({key: A, key.replace("lora_A", "lora_B"): B}, f)
        ref = agg.FlexLoRA(list(range(len(RANKS))), d, dict(enumerate(SIZES)), 0)
    ref_dw = next(iter(ref.values())).double()
    config = {"alpha": ALPHA, **{f"Client_{k}": {"layer": r} for k, r in enumerate(RANKS)}}
    ref_views = peft_utils.distribute_weight_fast(ref, config)
    R = max(RANKS)
    glob = {"l.adapter.U": torch.zeros(OUT, R, dtype=torch.float64), "l.adapter.V": torch.zeros(R, IN, dtype=torch.float64)}
    ours = lora_rules.aggregate("flexlora", glob, replies, [float(s) for s in SIZES], ALPHA)
    exact = sum(s / sum(SIZES) * lora_rules.delta(u["l.adapter.U"], u["l.adapter.V"], ALPHA)
                for s, u in zip(SIZES, replies))
    out = {"aggregate_vs_reference_max_abs": float((exact - ref_dw).abs().max()),
           "reference_max_abs": float(ref_dw.abs().max()), "downloads": {}}
    for r in RANKS:
        stem = next(k for k in ref_views if k.endswith(f"_A.local.weight.{r}"))[: -len(f"_A.local.weight.{r}")]
        rA, rB = ref_views[f"{stem}_A.local.weight.{r}"].double(), ref_views[f"{stem}_B.local.weight.{r}"].double()
        v = lora_rules.view("flexlora", ours, {"l": r}, ALPHA)
        mine = lora_rules.delta(v["l.adapter.U"], v["l.adapter.V"], ALPHA)
        theirs = ALPHA / r * rB @ rA
        out["downloads"][r] = {"delta_max_abs_diff": float((mine - theirs).abs().max()),
                               "A_rows_max_abs_diff_up_to_sign": float((v["l.adapter.V"].abs() - rA.abs()).abs().max())}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
