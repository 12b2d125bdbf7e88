"""The screen's evaluations of one round (:mod:`.screening`): the n + 1 leave-one-out aggregates, cut to one
budget, share their tensor shapes, so their losses on the server's sample come from one vectorized forward pass
(``torch.func.vmap`` of ``functional_call`` over the stacked states) instead of n + 1 model loads and passes.

:class:`StackedLosses` checks the batched losses against the one-model-at-a-time ones the first time it is used,
and keeps to the latter for the rest of the run where they disagree or the model has an operation ``vmap``
cannot batch (the screen's decisions never depend on how the losses were computed)."""
from __future__ import annotations

import logging
import math
import types
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, vmap

from fedlowrank.training.loop import eval_sums, evaluate_classifier, mean_loss_accuracy

from .aggregation import State

log = logging.getLogger(__name__)
MAX_STACKED = 50_000_000  # numbers stacked at once (200 MB in fp32): larger rounds go one model at a time
AGREE = 1e-5  # relative: batched and one-by-one losses differ by float rounding only


def batch_statistics(model: nn.Module) -> nn.Module:
    """``model`` (in place) with BatchNorm layers that normalize with each batch's own statistics, in eval mode
    too, and update nothing; their running buffers stay loadable. For the screen: the aggregated running statistics
    fit no budget's view (a federated ResNet's 0.1 view: 0.22 accuracy with them, 0.94 with the batch's own;
    results.md, "The other vision models"), so honest small-budget replies looked like attacks."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False  # in training mode: batch statistics, the buffers neither read nor written
            m.train = types.MethodType(lambda self, mode=True: nn.Module.train(self, True), m)
            m.training = True
    return model


def stacked_losses(model: nn.Module, states: list[State], loader) -> list[float]:
    """Loss on ``loader`` of ``model`` with each of ``states`` (the same keys and shapes; ``model`` built for
    them), by one ``vmap`` over the states stacked (M, ...) per batch: logits (M, B, ..., K)."""
    stacked = {k: torch.stack([s[k] for s in states]) for k in states[0]}
    model.eval()
    batched = vmap(lambda p, x: functional_call(model, p, (x,)), in_dims=(0, None))
    tot = torch.zeros(len(states), 3, dtype=torch.float64)
    with torch.no_grad(), warnings.catch_warnings():
        # vmap runs attention (ViT) through its per-sample fallback and warns of it at every call; the losses are
        # checked against one model at a time on first use, so the warning tells the user nothing to act on
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
        for x, y in loader:
            logits = batched(stacked, x)
            for m in range(len(states)):
                tot[m] += eval_sums(logits[m], y)
    return [mean_loss_accuracy(t)["loss"] for t in tot]


def numel(state: State) -> int:
    return sum(v.numel() for v in state.values())


def agree(a: list[float], b: list[float]) -> bool:
    """Equal to float rounding (non-finite values equal where both are NaN or the same infinity)."""
    return len(a) == len(b) and all(
        (x == y) or (math.isnan(x) and math.isnan(y)) or abs(x - y) <= AGREE * max(1.0, abs(y)) for x, y in zip(a, b))


class StackedLosses:
    """Losses of several states of one shape: batched once :meth:`__call__` has seen the batched path agree
    with the sequential one, sequential otherwise. ``model``: a model of the states' shapes, loaded with the
    given state (``LooScreen.model``)."""

    def __init__(self, model: Callable[[State], nn.Module], loader) -> None:
        self.model, self.loader = model, loader
        self.batched: bool | None = None  # None: not tried yet

    def one_by_one(self, states: list[State]) -> list[float]:
        return [evaluate_classifier(self.model(s), self.loader)["loss"] for s in states]

    def __call__(self, states: list[State]) -> list[float]:
        if self.batched is False or len(states) < 2 or numel(states[0]) * len(states) > MAX_STACKED:
            return self.one_by_one(states)
        try:
            out = stacked_losses(self.model(states[0]), states, self.loader)
        except Exception as e:  # noqa: BLE001 - an operation vmap cannot batch: one model at a time from now on
            log.debug("screen: batched evaluation unavailable (%s: %s); one model at a time", type(e).__name__, e)
            self.batched = False
            return self.one_by_one(states)
        if self.batched is None:  # first use: checked against one model at a time
            ref = self.one_by_one(states)
            self.batched = agree(out, ref)
            if not self.batched:
                log.debug("screen: batched losses %s disagree with %s; one model at a time", out, ref)
            return ref
        return out
