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
                     restart_warmup_steps: int, min_lr_ratio: float = 0.1, first_restart: int | None = None) -> float:
    """ReLoRA's jagged schedule: the global cosine (with its initial warm-up), multiplied by a
    linear ramp from 0 over ``restart_warmup_steps`` after every restart. Restarts happen at
    ``first_restart + k·restart_every`` (k ≥ 0; default first restart = ``restart_every``)."""
    base = cosine_lr(step, max_steps, lr, warmup_steps, min_lr_ratio)
    first = restart_every if first_restart is None else first_restart
    if restart_every <= 0 or step < max(first, 1) or restart_warmup_steps <= 0:
        return base
    since = (step - first) % restart_every
    if since < restart_warmup_steps:
        return base * since / restart_warmup_steps
    return base
