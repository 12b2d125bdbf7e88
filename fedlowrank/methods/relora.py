"""ReLoRA (Lialin et al. 2023, "ReLoRA: High-Rank Training Through Low-Rank Updates").

Optional full-rank warm start, then LoRA adapters on frozen dense linears. Every
``reset_every`` steps: merge ``W += s·B·A`` into the frozen weight, re-initialise A (Kaiming)
and B (zeros), prune the adapters' optimizer state, and restart the learning rate with a short
linear ramp (jagged cosine). As in the reference code (Guitaricet/relora), every parameter
that is not a wrapped frozen weight (embeddings, norms, lm_head, biases) trains too
(``train_base``), and the phase after the warm start gets its own warm-up + cosine cycle.

Differences from the reference, on purpose:
- a pruned optimizer entry loses *both* Adam moments (the reference prunes ``exp_avg`` and
  ``exp_avg_sq`` with separate masks, so an entry can keep m and lose v and step by lr·m/eps);
- with ``trainable_scaling`` the scale is re-initialised to its start value at a restart (the
  reference zeroes it, which leaves B = 0 and tanh(0) = 0: no factor gets a gradient again).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from fedlowrank.lowrank.layers import growth_generator
from fedlowrank.lowrank.lora import LoRALinear, add_lora, lora_modules
from fedlowrank.training.schedulers import cosine_lr, jagged_cosine_lr

log = logging.getLogger(__name__)


@dataclass
class ReLoRAConfig:
    name: str = "relora"
    r: int | None = None  # adapter rank (null: ratio of each matrix's full rank, or 8); wins over ratio
    ratio: float | None = None
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: [r"attn\.", r"mlp\."])
    skip: list[str] = field(default_factory=lambda: ["lm_head"])
    warm_start_steps: int | None = None  # full-rank steps before the adapters attach (null: the fraction, or 0)
    reset_every: int | None = None  # merge-and-reinit cycle length in steps (null: the fraction, or 50)
    # fractions of trainer.max_steps, used where the step count above is null (see for_steps)
    warm_start_fraction: float | None = None
    reset_fraction: float | None = None
    restart_warmup_steps: int = 10  # linear LR ramp after each restart
    # reference default (--reset_optimizer_on_relora): random pruning of 99.9% of the state
    prune_ratio: float = 0.999
    prune: str = "random"  # random | magnitude (by |exp_avg|; both moments pruned together)
    train_base: bool = True  # non-adapter, non-wrapped params (embeddings, norms, head, biases) train
    train_extra: list[str] = field(default_factory=list)  # regexes of further params that train
    trainable_scaling: bool = False  # s = tanh(c), c learned (reference --train_scaling)
    lr: float | None = None  # peak LR after the warm start (null: trainer.lr)
    warmup_steps: int | None = None  # first warm-up after the warm start (null: trainer.warmup_steps)
    adapter_beta2: float | None = None  # Adam β2 of the adapters (reference: 0.999; null: trainer.beta2)
    adapter_weight_decay: float | None = None  # (reference: 0.0; null: trainer.weight_decay)

    def validate(self) -> None:
        if (self.r is not None and self.r < 1) or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ValueError("method.r must be >= 1, method.alpha > 0 and method.dropout in [0, 1)")
        if (self.reset_every is not None and self.reset_every < 1) or self.restart_warmup_steps < 0 or (
                self.warm_start_steps is not None and self.warm_start_steps < 0):
            raise ValueError("method.reset_every must be >= 1; warm_start_steps, restart_warmup_steps >= 0")
        if self.reset_every is not None and self.restart_warmup_steps >= self.reset_every:
            raise ValueError("method.restart_warmup_steps must be smaller than method.reset_every")
        if self.ratio is not None and not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"method.ratio must be in (0, 1], got {self.ratio}")
        for key in ("warm_start_fraction", "reset_fraction"):
            f = getattr(self, key)
            if f is not None and not 0.0 < f < 1.0:
                raise ValueError(f"method.{key} must be in (0, 1) (a fraction of trainer.max_steps), got {f}")
        if not 0.0 <= self.prune_ratio <= 1.0:
            raise ValueError(f"method.prune_ratio must be in [0, 1], got {self.prune_ratio}")
        if self.prune not in ("magnitude", "random"):
            raise ValueError(f"method.prune must be magnitude|random, got {self.prune!r}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"method.lr must be > 0, got {self.lr}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"method.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.adapter_beta2 is not None and not 0.0 <= self.adapter_beta2 < 1.0:
            raise ValueError(f"method.adapter_beta2 must be in [0, 1), got {self.adapter_beta2}")
        if self.adapter_weight_decay is not None and self.adapter_weight_decay < 0:
            raise ValueError(f"method.adapter_weight_decay must be >= 0, got {self.adapter_weight_decay}")

    def for_steps(self, max_steps: int | None) -> "ReLoRAConfig":
        """This config for a run of ``max_steps``, validated: a step count left null comes from its
        fraction (rounded; a cycle is at least one step), else from the defaults 0 and 50. A step
        count that is set wins over its fraction. Fractions need ``max_steps`` (central mode)."""
        if max_steps is None and (self.warm_start_fraction is not None or self.reset_fraction is not None):
            raise ValueError("method.warm_start_fraction / reset_fraction are fractions of trainer.max_steps "
                             "(central mode); set method.warm_start_steps / reset_every instead")
        self.validate()

        def steps(given: int | None, fraction: float | None, default: int, least: int) -> int:
            if given is not None:
                return given
            return default if fraction is None else max(least, round(fraction * max_steps))  # type: ignore

        out = replace(self, warm_start_fraction=None, reset_fraction=None,
                      warm_start_steps=steps(self.warm_start_steps, self.warm_start_fraction, 0, 0),
                      reset_every=steps(self.reset_every, self.reset_fraction, 50, 1))
        out.validate()
        return out


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def prune_mask(t: Tensor, ratio: float, mode: str, generator: torch.Generator | None = None) -> Tensor:
    """Boolean mask (shape of the local shard) with exactly round(ratio·numel) True entries:
    the smallest |t| (magnitude) or a uniformly random subset."""
    flat = _local(t).reshape(-1)
    k = int(round(ratio * flat.numel()))
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k > 0:
        if mode == "magnitude":
            idx = torch.topk(flat.abs().float(), k, largest=False).indices
        else:
            idx = torch.randperm(flat.numel(), generator=generator)[:k].to(flat.device)
        mask[idx] = True
    return mask.view(_local(t).shape)


@torch.no_grad()
def prune_tensor_(t: Tensor, ratio: float, mode: str, generator: torch.Generator | None = None) -> int:
    """Zero exactly round(ratio·numel) entries of ``t`` in place (see :func:`prune_mask`).
    FSDP2 shards are pruned shard by shard."""
    mask = prune_mask(t, ratio, mode, generator)
    _local(t)[mask] = 0
    return int(mask.sum())


class ReLoRA:
    """Policy acting on a model's LoRA adapters and on the optimizer holding them."""

    def __init__(self, cfg: ReLoRAConfig, seed: int = 0, max_steps: int | None = None) -> None:
        self.cfg, self.seed = cfg.for_steps(max_steps), seed

    def wrap(self, model: nn.Module, r: int | None = None, ratio: float | None = None) -> list[str]:
        """Attach adapters to target linears and set what trains (see :meth:`freeze`).
        The adapter rank is ``cfg.r``, else ``cfg.ratio`` of full rank, else 8, unless a budget
        (``r`` or ``ratio``) is given."""
        if r is None and ratio is None:
            r, ratio = self.cfg.r, self.cfg.ratio
            r, ratio = (r, None) if r is not None else ((None, ratio) if ratio is not None else (8, None))
        names = add_lora(model, r=r, ratio=ratio, alpha=self.cfg.alpha, dropout=self.cfg.dropout,
                         targets=self.cfg.targets or None, skip=self.cfg.skip,
                         trainable_scaling=self.cfg.trainable_scaling)
        self.freeze(model)
        return names

    def freeze(self, model: nn.Module) -> None:
        """Adapters train; wrapped base weights are frozen; everything else trains when
        ``train_base`` (the reference), or only when it matches ``train_extra``."""
        frozen = {f"{n}.base.weight" for n in lora_modules(model)}
        for n, p in model.named_parameters():
            adapter = ".adapter." in f".{n}" or n.endswith(".scale_param")
            extra = any(re.search(x, n) for x in self.cfg.train_extra)
            p.requires_grad_(adapter or extra or (self.cfg.train_base and n not in frozen))

    @staticmethod
    def adapter_params(model: nn.Module) -> list[nn.Parameter]:
        """Parameters whose optimizer state a restart prunes (A, B and a trainable scale)."""
        return [p for m in lora_modules(model).values() for p in m.adapter_parameters()]

    def is_restart(self, step: int, max_steps: int | None = None) -> bool:
        """A merge-and-reinit happens after optimizer step ``step`` (never after the last one,
        ``max_steps``: nothing would train the new adapters; the reference has none there either)."""
        w = self.cfg.warm_start_steps
        last = max_steps is not None and step >= max_steps
        return step > w and (step - w) % self.cfg.reset_every == 0 and not last

    def lr(self, step: int, max_steps: int, lr: float, warmup_steps: int, min_lr_ratio: float) -> float:
        """Warm start: the full-rank run's cosine. Afterwards a new cycle over the remaining
        steps (own peak LR and warm-up), with a ramp after every restart (jagged cosine)."""
        c, w = self.cfg, self.cfg.warm_start_steps
        if step < w:
            return cosine_lr(step, max_steps, lr, warmup_steps, min_lr_ratio)
        return jagged_cosine_lr(step - w, max(1, max_steps - w), c.lr or lr,
                                warmup_steps if c.warmup_steps is None else c.warmup_steps,
                                c.reset_every, c.restart_warmup_steps, min_lr_ratio)

    @torch.no_grad()
    def restart(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, step: int) -> None:
        """Merge every adapter into its base, re-init A/B, prune the adapters' optimizer state."""
        mods = lora_modules(model)
        for i, name in enumerate(sorted(mods)):
            g = growth_generator(self.seed, step, i)
            mods[name].merge()
            mods[name].reinit(generator=g)
        if optimizer is not None:
            self.prune_state(optimizer, self.adapter_params(model), step)
        log.info("ReLoRA restart at step %d: merged %d adapters, pruned %.1f%% of their optimizer state (%s)",
                 step, len(mods), 100 * self.cfg.prune_ratio, self.cfg.prune)

    def prune_state(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter], step: int) -> None:
        """Zero the same entries of every per-element state tensor of each parameter. The
        mask comes from ``exp_avg`` (magnitude) or one random draw, so no entry keeps a first
        moment without its second moment."""
        g = torch.Generator().manual_seed(self.seed * 31 + step)
        for p in params:
            st = optimizer.state.get(p, {})
            moments = [v for v in st.values() if torch.is_tensor(v) and v.ndim > 0 and v.shape == p.shape]
            if not moments:
                continue
            ref = st.get("exp_avg", moments[0])
            mask = prune_mask(ref, self.cfg.prune_ratio, self.cfg.prune, g)
            for v in moments:
                _local(v)[mask] = 0


def adapter_param_groups(model: nn.Module, weight_decay: float, betas: tuple[float, float],
                         cfg: ReLoRAConfig) -> list[dict]:
    """AdamW groups with the adapters' own β2 / weight decay (ReLoRA reference: 0.999 / 0)."""
    from fedlowrank.training.optim import param_groups

    adapters = {id(p) for p in ReLoRA.adapter_params(model)}
    base = param_groups(model, weight_decay, exclude=adapters)
    ad = [p for p in ReLoRA.adapter_params(model) if p.requires_grad]
    b2 = betas[1] if cfg.adapter_beta2 is None else cfg.adapter_beta2
    wd = weight_decay if cfg.adapter_weight_decay is None else cfg.adapter_weight_decay
    groups = [g for g in base if g["params"]]
    mats = [p for p in ad if p.ndim >= 2]
    scal = [p for p in ad if p.ndim < 2]
    if mats:
        groups.append({"params": mats, "weight_decay": wd, "betas": (betas[0], b2)})
    if scal:
        groups.append({"params": scal, "weight_decay": 0.0, "betas": (betas[0], b2)})
    return groups


__all__ = ["LoRALinear", "ReLoRA", "ReLoRAConfig", "adapter_param_groups", "prune_mask", "prune_tensor_"]
