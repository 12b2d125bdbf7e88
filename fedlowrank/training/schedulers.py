"""Learning-rate schedules as pure functions of the optimizer step."""
from __future__ import annotations

import math


def cosine_lr(step: int, max_steps: int, lr: float, warmup_steps: int = 0, min_lr_ratio: float = 0.1) -> float:
    """Linear warm-up from 0 for ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr`` at ``max_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def jagged_cosine_lr(step: int, max_steps: int, lr: float, warmup_steps: int, restart_every: int,
                     restart_warmup_steps: int, min_lr_ratio: float = 0.1) -> float:
    """ReLoRA's jagged schedule (the reference's ``cosine_restarts``): one cosine over
    ``max_steps`` with its initial warm-up; after every restart (steps ``k·restart_every``,
    k ≥ 1) a linear ramp over ``restart_warmup_steps`` up to the cosine's value at the ramp's end.
    ``step`` is the 0-based index of the step about to be taken."""
    if step < warmup_steps or restart_every <= 0 or restart_warmup_steps <= 0 or step < restart_every:
        return cosine_lr(step, max_steps, lr, warmup_steps, min_lr_ratio)
    since = step % restart_every
    if since >= restart_warmup_steps:
        return cosine_lr(step, max_steps, lr, warmup_steps, min_lr_ratio)
    top = cosine_lr(step - since + restart_warmup_steps, max_steps, lr, warmup_steps, min_lr_ratio)
    return top * (since + 1) / (restart_warmup_steps + 1)
