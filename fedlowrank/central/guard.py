"""Non-finite loss guard for the training loop, without a host sync per step on the GPU."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist


class NonFiniteGuard:
    """Remembers, on the device, the first step whose loss was not finite; ``check`` reads it (one sync,
    and an all-reduce across processes) and raises ``FloatingPointError`` naming that step."""

    def __init__(self, ckpt_dir: Path) -> None:
        self.ckpt_dir = ckpt_dir
        self.first_bad: torch.Tensor | None = None  # () int64, -1 while every loss was finite

    def note(self, loss: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss.detach())
        if self.first_bad is None:
            self.first_bad = torch.full((), -1, dtype=torch.long, device=bad.device)
        self.first_bad = torch.where((self.first_bad < 0) & bad, torch.full_like(self.first_bad, step), self.first_bad)

    def check(self, distributed: bool) -> None:
        if self.first_bad is None:
            return
        never = torch.iinfo(torch.long).max
        first = torch.where(self.first_bad < 0, torch.full_like(self.first_bad, never), self.first_bad).reshape(1)
        if distributed:
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        if int(first.item()) != never:
            raise FloatingPointError(f"non-finite training loss at step {int(first.item())}; training stopped; "
                                     f"the newest finite checkpoint is kept in {self.ckpt_dir}")
