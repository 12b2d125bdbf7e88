"""What the central trainer trains on: a task gives the batch of each (step, process, micro-batch), the loss, the
held-out evaluation and the FLOPs of one unit. :class:`LMTask`: next-token prediction on a token stream (GPT-2,
LLaMA, the character LSTM and Transformer; the unit is a token). :class:`ClassifierTask`: image classification
(the unit is an image). Batches are functions of (seed, step, process, micro-batch), so a resumed run draws
exactly the batches the uninterrupted one would have."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from fedlowrank.data.text import TextData, eval_windows, get_batch
from fedlowrank.data.vision import ImageData, augment_crop_flip
from fedlowrank.lowrank import count_flops
from fedlowrank.training.loop import cross_entropy, eval_sums, mean_loss_accuracy

from .throughput import train_flops, train_flops_per_token

if TYPE_CHECKING:
    from fedlowrank.config.central import CentralRun

    from .trainer import Trainer


def _reduce(tot: torch.Tensor, distributed: bool) -> dict[str, float]:
    if distributed:
        dist.all_reduce(tot)
    return mean_loss_accuracy(tot)


class LMTask:
    """Next-token prediction on ``data``'s token streams; held-out loss, perplexity and top-1 accuracy."""

    unit = "tokens"

    def __init__(self, data: TextData, batch_size: int, block_size: int, seed: int) -> None:
        self.data, self.batch_size, self.block_size, self.seed = data, batch_size, block_size, seed
        self.vocab_size: int | None = data.vocab_size
        self.units_per_batch = batch_size * block_size

    def batch(self, step: int, rank: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: (B, T) token ids, y = x shifted by one."""
        return get_batch(self.data.train, self.batch_size, self.block_size, self.seed, step, rank, micro)

    loss = staticmethod(cross_entropy)  # (B, T, V) logits, (B, T) targets

    @torch.no_grad()
    def evaluate(self, tr: "Trainer") -> dict[str, float]:
        """``eval_iters`` random batches of the eval split, or every non-overlapping window (``eval_full``,
        shared out across processes)."""
        t, env, val = tr.t, tr.env, self.data.val
        tot = torch.zeros(3, dtype=torch.float64, device=env.device)
        if t.eval_full:
            starts = eval_windows(val, t.block_size)[env.rank::env.world]
            batches = [starts[i: i + t.batch_size].tolist() for i in range(0, len(starts), t.batch_size)]
            pairs = ((torch.stack([val[j: j + t.block_size] for j in ix]),
                      torch.stack([val[j + 1: j + 1 + t.block_size] for j in ix])) for ix in batches)
        else:
            pairs = (get_batch(val, t.batch_size, t.block_size, self.seed + 1, i, env.rank)
                     for i in range(t.eval_iters))
        for x, y in pairs:
            with tr.autocast():
                logits = tr.wrapped(x.to(env.device))
            tot += eval_sums(logits, y.to(env.device))
        ev = _reduce(tot, env.distributed)
        return {**ev, "ppl": math.exp(min(ev["loss"], 50.0))}

    def flops_per_unit(self, model: nn.Module, device: torch.device) -> float:
        return train_flops_per_token(model, self.block_size, device)

    def example(self, device: torch.device) -> torch.Tensor:
        """One input for the forward-FLOP count: a sequence of ``block_size`` tokens."""
        return torch.zeros(1, self.block_size, dtype=torch.long, device=device)


class ClassifierTask:
    """Image classification: epochs of seeded permutations of the training set (CIFAR's crop-and-flip when
    ``augment``), top-1 accuracy on the whole held-out set."""

    unit = "samples"
    vocab_size = None

    def __init__(self, data: ImageData, batch_size: int, seed: int, world: int, grad_accum: int,
                 augment: tuple[float, ...] | None = None) -> None:
        self.data, self.batch_size, self.seed, self.augment = data, batch_size, seed, augment
        self.per_step = batch_size * world * grad_accum  # samples of one optimizer step over all processes
        self.world = world
        self.units_per_batch = batch_size
        self._perm: tuple[int, torch.Tensor] | None = None

    def _epoch_perm(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(len(self.data.y_train), generator=g))
        return self._perm[1]

    def indices(self, step: int, rank: int, micro: int) -> torch.Tensor:
        """Training-set rows of this batch: position ``step * per_step + (micro * world + rank) * B`` of the
        epoch-by-epoch permuted stream (a batch may span two epochs)."""
        n = len(self.data.y_train)
        start = step * self.per_step + (micro * self.world + rank) * self.batch_size
        pos = torch.arange(start, start + self.batch_size)
        out = torch.empty(self.batch_size, dtype=torch.long)
        for epoch in pos.div(n, rounding_mode="floor").unique().tolist():
            sel = pos // n == epoch
            out[sel] = self._epoch_perm(epoch)[pos[sel] % n]
        return out

    def batch(self, step: int, rank: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, C, H, W) float, y: (B,) class ids."""
        ix = self.indices(step, rank, micro)
        x, y = self.data.x_train[ix], self.data.y_train[ix]
        if self.augment is not None:
            g = torch.Generator().manual_seed(((self.seed * 7919 + step) * 104729 + rank) * 31 + micro)
            x = augment_crop_flip(x, g, fill=self.augment)
        return x, y

    loss = staticmethod(cross_entropy)  # (B, K) logits, (B,) targets

    @torch.no_grad()
    def evaluate(self, tr: "Trainer") -> dict[str, float]:
        """Every held-out image once, shared out across processes."""
        env = tr.env
        xs, ys = self.data.x_test[env.rank::env.world], self.data.y_test[env.rank::env.world]
        tot = torch.zeros(3, dtype=torch.float64, device=env.device)
        step = max(self.batch_size, 256)
        for i in range(0, len(ys), step):
            with tr.autocast():
                logits = tr.wrapped(xs[i: i + step].to(env.device))
            tot += eval_sums(logits, ys[i: i + step].to(env.device))
        return _reduce(tot, env.distributed)

    def flops_per_unit(self, model: nn.Module, device: torch.device) -> float:
        """Training FLOPs (forward + backward) of one image, counted in eval mode without touching the run's RNG
        or gradients."""
        return train_flops(model, self.example(device), device)

    def example(self, device: torch.device) -> torch.Tensor:
        """One input for the forward-FLOP count: one image."""
        return torch.zeros(1, *self.data.shape, device=device)


Task = LMTask | ClassifierTask


def make_task(run: "CentralRun", world: int, data: TextData | ImageData) -> Task:
    """The task of ``data``: next-token prediction on text, classification on images (CIFAR's crop-and-flip
    when ``data.augment`` is on)."""
    from fedlowrank.data.vision import black_fill

    t = run.trainer
    if isinstance(data, ImageData):
        aug = black_fill(run.data.name) if getattr(run.data, "augmented", False) else None
        return ClassifierTask(data, t.batch_size, run.seed, world, t.grad_accum, aug)
    return LMTask(data, t.batch_size, t.block_size, run.seed)


@torch.no_grad()
def forward_flops(task: Task, model: nn.Module, device: torch.device) -> int:
    """FLOPs of one forward pass over one example (an image, or a ``block_size`` sequence) on the model as it is
    (dense or factorized), as the low-rank literature reports them."""
    was = model.training
    model.eval()
    try:
        return count_flops(model, task.example(device))
    finally:
        model.train(was)
