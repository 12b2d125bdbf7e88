"""ReLoRA (Lialin et al. 2023, "ReLoRA: High-Rank Training Through Low-Rank Updates").

Optional full-rank warm start, then LoRA adapters on frozen dense linears. Every
``reset_every`` steps: merge ``W += s·B·A`` into the frozen weight, re-initialise A (Kaiming)
and B (zeros), prune the adapters' optimizer state (magnitude or random, ``prune_ratio``),
and restart the learning rate with a short linear warm-up (jagged cosine schedule).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fedlowrank.lowrank.lora import add_lora, lora_modules
from fedlowrank.training.schedulers import jagged_cosine_lr

log = logging.getLogger(__name__)


@dataclass
class ReLoRAConfig:
    name: str = "relora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: [r"attn\.", r"mlp\."])
    skip: list[str] = field(default_factory=lambda: ["lm_head"])
    warm_start_steps: int = 0  # full-rank steps before the adapters are attached
    reset_every: int = 50  # merge-and-reinit cycle length (optimizer steps)
    restart_warmup_steps: int = 10  # linear LR ramp after each restart
    prune_ratio: float = 0.9
    prune: str = "magnitude"  # magnitude | random
    train_extra: list[str] = field(default_factory=list)  # regexes of non-adapter params that also train

    def validate(self) -> None:
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ValueError("method.r must be >= 1, method.alpha > 0 and method.dropout in [0, 1)")
        if self.reset_every < 1 or self.warm_start_steps < 0 or self.restart_warmup_steps < 0:
            raise ValueError("method.reset_every must be >= 1; warm_start_steps, restart_warmup_steps >= 0")
        if self.restart_warmup_steps >= self.reset_every:
            raise ValueError("method.restart_warmup_steps must be smaller than method.reset_every")
        if not 0.0 <= self.prune_ratio <= 1.0:
            raise ValueError(f"method.prune_ratio must be in [0, 1], got {self.prune_ratio}")
        if self.prune not in ("magnitude", "random"):
            raise ValueError(f"method.prune must be magnitude|random, got {self.prune!r}")


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def prune_tensor_(t: Tensor, ratio: float, mode: str, generator: torch.Generator | None = None) -> int:
    """Zero exactly round(ratio·numel) entries of ``t`` in place: the smallest |values|
    (magnitude) or a uniformly random subset. FSDP2 shards are pruned shard by shard."""
    flat = _local(t).reshape(-1)
    k = int(round(ratio * flat.numel()))
    if k <= 0:
        return 0
    if mode == "magnitude":
        idx = torch.topk(flat.abs().float(), k, largest=False).indices
    else:
        idx = torch.randperm(flat.numel(), generator=generator)[:k].to(flat.device)
    flat[idx] = 0
    return k


class ReLoRA:
    """Policy acting on a model's LoRA adapters and on the optimizer holding them."""

    def __init__(self, cfg: ReLoRAConfig, seed: int = 0) -> None:
        cfg.validate()
        self.cfg, self.seed = cfg, seed

    def wrap(self, model: nn.Module, r: int | None = None, ratio: float | None = None) -> list[str]:
        """Attach adapters to target linears and freeze everything but adapters (+ ``train_extra``).
        The adapter rank is ``cfg.r`` unless a budget (``r`` or ``ratio`` of full rank) is given."""
        if r is None and ratio is None:
            r = self.cfg.r
        names = add_lora(model, r=r, ratio=ratio, alpha=self.cfg.alpha, dropout=self.cfg.dropout,
                         targets=self.cfg.targets or None, skip=self.cfg.skip)
        self.freeze(model)
        return names

    def freeze(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            p.requires_grad_(".adapter." in f".{n}" or any(re.search(x, n) for x in self.cfg.train_extra))

    def is_restart(self, step: int) -> bool:
        """A merge-and-reinit happens after optimizer step ``step``."""
        w = self.cfg.warm_start_steps
        return step > w and (step - w) % self.cfg.reset_every == 0

    def lr(self, step: int, max_steps: int, lr: float, warmup_steps: int, min_lr_ratio: float) -> float:
        first = self.cfg.warm_start_steps if self.cfg.warm_start_steps > 0 else self.cfg.reset_every
        return jagged_cosine_lr(step, max_steps, lr, warmup_steps, self.cfg.reset_every,
                                self.cfg.restart_warmup_steps, min_lr_ratio, first_restart=first)

    @torch.no_grad()
    def restart(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, step: int) -> None:
        """Merge every adapter into its base, re-init A/B, prune the adapters' optimizer state."""
        mods = lora_modules(model)
        for i, name in enumerate(sorted(mods)):
            g = torch.Generator().manual_seed(self.seed * 7919 + step * 104729 + i)
            mods[name].merge()
            mods[name].reinit(generator=g)
        if optimizer is not None:
            self.prune_state(optimizer, [p for m in mods.values() for p in m.adapter.parameters()], step)
        log.info("ReLoRA restart at step %d: merged %d adapters, pruned %.0f%% of their optimizer state (%s)",
                 step, len(mods), 100 * self.cfg.prune_ratio, self.cfg.prune)

    def prune_state(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter], step: int) -> None:
        g = torch.Generator().manual_seed(self.seed * 31 + step)
        for p in params:
            for v in optimizer.state.get(p, {}).values():
                if torch.is_tensor(v) and v.ndim > 0 and v.shape == p.shape:
                    prune_tensor_(v, self.cfg.prune_ratio, self.cfg.prune, g)
