"""The low-rank LSTM against the dense custom cell and ``nn.LSTM`` (the reference's open problem: its low-rank
LSTM is "still very slow compared to the built-in LSTM"). One run times, for each hidden size, forward and
forward+backward of one LSTM layer over a (batch, time, input) sequence:

* ``nn_lstm``: ``torch.nn.LSTM`` (fused kernels);
* ``dense_cell``: :class:`fedlowrank.models.lstm.LSTMCellLinear`, dense ``W_ih`` / ``W_hh`` (the baseline);
* ``lowrank_cell``: the same cell factorized at ``--ratio`` (``factorize``), each recurrent mode of the cell.

Ratios are against ``dense_cell`` from the same run; FLOPs are counted by ``torch.utils.flop_counter``.

    python benchmarks/bench_lstm.py [--hidden 128 256 512] [--ratio 0.2] [--out benchmarks/results_cpu/lstm.json]
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import emit, environment, timeit  # noqa: E402

from fedlowrank.lowrank import count_flops, count_params, factorize  # noqa: E402
from fedlowrank.models.lstm import RECURRENT_MODES, LSTMCellLinear  # noqa: E402


class TorchLSTM(nn.Module):
    def __init__(self, d_in: int, hidden: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(d_in, hidden, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lstm(x)[0]


def timings(layer: nn.Module, x: torch.Tensor, iters: int) -> dict[str, float]:
    params = [p for p in layer.parameters() if p.requires_grad]
    gy = torch.randn_like(layer(x))

    def fwd():
        with torch.no_grad():
            layer(x)

    def fwd_bwd():
        torch.autograd.grad(layer(x), [x, *params], gy)

    return {"fwd_s": timeit(fwd, warmup=2, iters=iters), "fwd_bwd_s": timeit(fwd_bwd, warmup=2, iters=iters)}


def one_size(hidden: int, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    d_in = args.emb if args.emb else hidden
    x = torch.randn(args.batch, args.time, d_in, requires_grad=True)
    dense = LSTMCellLinear(d_in, hidden)
    low = copy.deepcopy(dense)
    factorize(low, ratio=args.ratio, targets=[r"W_ih", r"W_hh"])
    out = {"hidden": hidden, "input": d_in, "nn_lstm": timings(TorchLSTM(d_in, hidden), x, args.iters),
           "dense_cell": {**timings(dense, x, args.iters), "params": count_params(dense),
                          "flops_fwd": count_flops(dense, x)}}
    for mode in RECURRENT_MODES:
        low.recurrent = mode
        res = {**timings(low, x, args.iters), "params": count_params(low), "flops_fwd": count_flops(low, x)}
        out[f"lowrank_cell_{mode}"] = res
    base = out["dense_cell"]
    for k, v in out.items():
        if isinstance(v, dict):
            v["fwd_ratio_vs_dense_cell"] = v["fwd_s"] / base["fwd_s"]
            v["fwd_bwd_ratio_vs_dense_cell"] = v["fwd_bwd_s"] / base["fwd_bwd_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--emb", type=int, default=8, help="input size (LEAF's embedding 8); 0: the hidden size")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--time", type=int, default=80)
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [one_size(h, args) for h in args.hidden]
    emit("lstm", {"environment": environment("cpu"), "threads": torch.get_num_threads(),
                  "settings": {k: v for k, v in vars(args).items() if k != "out"}, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
