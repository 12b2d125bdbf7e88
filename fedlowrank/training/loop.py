"""One train loop / evaluation shared by central mode and federated clients: classification, or
next-token prediction where the model returns (B, T, vocab) and targets are (B, T)."""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from fedlowrank.lowrank import frobenius_decay

from .optim import SGD

IGNORE = -100  # a target that is not scored (cross-entropy's ignore_index; left out of accuracy and counts)


def _flat(logits: torch.Tensor) -> torch.Tensor:
    """(B, classes) stays; (B, T, vocab) -> (B·T, vocab) for next-token targets (B, T)."""
    return logits.reshape(-1, logits.shape[-1])


def train_classifier(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer | SGD,
    epochs: int = 1,
    max_steps: int | None = None,
    frob_decay: float = 0.0,
    device: str | torch.device = "cpu",
    before_step: Callable[[int], None] | None = None,
    prox_mu: float = 0.0,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    penalty: Callable[[], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Cross-entropy training with optional Frobenius decay on factorized layers and FedProx's proximal term
    ``prox_mu / 2 · ||w − w₀||²`` over the trainable parameters (w₀: their values when training starts, i.e.
    what the client downloaded; on a factorized model the factors U, V, not their product).

    ``penalty``: a term added to each step's objective (e.g. HetLoRA's tail penalty), recomputed every step.
    ``autocast``: a fresh context per step around the forward pass and the loss only (e.g. bf16 autocast); one
    context around many steps would reuse its cached low-precision copies of the weights after they change.
    Raises FloatingPointError on a non-finite loss (the caller decides what a failure means).
    Returns mean loss, accuracy and optimizer steps taken.
    """
    model.train()
    total, correct, loss_sum, steps = 0, 0, 0.0, 0
    anchor = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad] if prox_mu > 0 else []
    for _ in range(epochs):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            if before_step is not None:
                before_step(steps)  # e.g. sample a nested sub-model's ranks (ordered dropout)
            with autocast():
                logits = _flat(model(x))  # (N, classes); sequences: every position is a prediction
                y = y.reshape(-1)
                loss = cross_entropy(logits, y)  # IGNORE targets left out
            obj = loss + frob_decay * frobenius_decay(model) if frob_decay > 0 else loss
            if anchor:
                obj = obj + 0.5 * prox_mu * sum((p - p0).square().sum() for p, p0 in anchor)
            if penalty is not None:
                obj = obj + penalty()
            if not torch.isfinite(obj):
                raise FloatingPointError(f"non-finite training loss at step {steps}: {obj.item()}")
            optimizer.zero_grad(set_to_none=True)
            obj.backward()
            optimizer.step()
            steps += 1
            scored = y != IGNORE
            n = int(scored.sum())
            loss_sum += loss.item() * n
            total += n
            correct += (logits.argmax(-1) == y)[scored].sum().item()
            if max_steps is not None and steps >= max_steps:
                break
        if max_steps is not None and steps >= max_steps:
            break
    return {"loss": loss_sum / max(1, total), "accuracy": correct / max(1, total), "steps": float(steps)}


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of (..., K) logits against (...) targets, in float32, IGNORE targets left out."""
    return F.cross_entropy(_flat(logits.float()), y.reshape(-1), ignore_index=IGNORE)


def eval_sums(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[summed cross-entropy, correct top-1, scored count] of (..., K) logits against (...) targets, float64;
    IGNORE targets are not scored. Sums add across batches and processes."""
    flat, y = _flat(logits.float()), y.reshape(-1)
    scored = y != IGNORE
    return torch.stack([F.cross_entropy(flat, y, reduction="sum", ignore_index=IGNORE).double(),
                        (flat.argmax(-1) == y)[scored].sum().double(), scored.sum().double()])


def example_sums(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N, 3) ``eval_sums`` of each example of (N, ..., K) logits against (N, ...) targets (a sequence's
    positions summed), float64; summed over N they equal ``eval_sums`` of the batch."""
    n = y.shape[0]
    flat, yf = _flat(logits.float()), y.reshape(-1)
    scored = yf != IGNORE
    ce = F.cross_entropy(flat, yf, reduction="none", ignore_index=IGNORE)  # 0 where not scored
    hit = (flat.argmax(-1) == yf) & scored
    return torch.stack([ce.double().reshape(n, -1).sum(1), hit.double().reshape(n, -1).sum(1),
                        scored.double().reshape(n, -1).sum(1)], dim=1)


def mean_loss_accuracy(tot: torch.Tensor) -> dict[str, float]:
    """``eval_sums`` totals -> mean loss (NaN if not finite) and accuracy."""
    n = tot[2].clamp_min(1)
    loss = (tot[0] / n).item()
    return {"loss": loss if math.isfinite(loss) else float("nan"), "accuracy": (tot[1] / n).item()}


@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader: DataLoader, device: str | torch.device = "cpu") -> dict[str, float]:
    model.eval()
    tot = torch.zeros(3, dtype=torch.float64)
    for x, y in loader:
        tot += eval_sums(model(x.to(device)), y.to(device)).cpu()  # e.g. LEAF scores only each window's last target
    return mean_loss_accuracy(tot)
