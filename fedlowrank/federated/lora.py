"""Federated LoRA fine-tuning of a pretrained LLM with a different adapter rank per client (``method=lora``).

The frozen base is the checkpoint's, loaded once per process and shared by every model built in it
(:func:`fedlowrank.federated.task.build_model`); the global state, every download and every reply hold only the
adapters, ``p.adapter.U`` = B (out, r) and ``p.adapter.V`` = A (r, in), in the convention of
:mod:`.lora_rules` (ΔW = (α/r)·B·A, r read from the shapes). The strategy (``fedit``, ``hetlora``, ``flexlora``,
``ffa``, ``product``) decides what a client downloads and how replies combine
(:class:`fedlowrank.federated.methods.LoRAFed`)."""
from __future__ import annotations

import logging

import torch
from torch import nn

from fedlowrank.config import FederatedRun, to_dataclass
from fedlowrank.config.fed_lora import FedLoRAConfig
from fedlowrank.lowrank.factorize import matches_any, set_submodule
from fedlowrank.lowrank.lora import LoRALinear

from . import lora_rules
from .aggregation import State
from .task import build_model

log = logging.getLogger(__name__)
_B, _A = lora_rules.B_KEY, lora_rules.A_KEY


def target_linears(model: nn.Module, cfg: FedLoRAConfig) -> dict[str, nn.Linear]:
    """The base's nn.Linear modules that get adapters, by name."""
    return {n: m for n, m in model.named_modules() if type(m) is nn.Linear and n
            and matches_any(n, cfg.targets) and not matches_any(n, cfg.skip)}


class FLoRALinear(LoRALinear):
    """A LoRALinear whose frozen part is the shared base plus FLoRA's merged adapters, kept thin:
    ``y = base(x) + x·Vₘᵀ·Uₘᵀ + s·B·A·x``; Uₘ (out, K), Vₘ (K, in) are buffers, never trained."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float, merged_U: torch.Tensor,
                 merged_V: torch.Tensor) -> None:
        super().__init__(base, r, lora_rules.lora_scale(alpha, r) * r, dropout)
        self.register_buffer("merged_U", merged_U)
        self.register_buffer("merged_V", merged_V)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        merged = (x @ self.merged_V.T.to(x.dtype)) @ self.merged_U.T.to(x.dtype)
        return super().forward(x) + merged

    @torch.no_grad()
    def delta(self) -> torch.Tensor:
        """Everything added to the base weight: the merged adapters and this round's, (out, in) float32."""
        return super().delta() + self.merged_U.float() @ self.merged_V.float()

    def fresh(self, r: int, alpha: float, dropout: float) -> FLoRALinear:
        """The same frozen part with a new rank-r adapter (A drawn from torch's generator, B = 0)."""
        return FLoRALinear(self.base, r, alpha, dropout, self.merged_U, self.merged_V)


def lora_model(run: FederatedRun, state: State) -> nn.Module:
    """The shared frozen base with an adapter on every layer ``state`` names, at the rank of its tensors, loaded
    from ``state`` (FLoRA's merged factors: a rank-1 adapter at B = 0 over them, replaced by the client's own in
    ``LoRAFed.prepare_client``). Only adapters are trainable."""
    cfg = to_dataclass(FedLoRAConfig, run.method, "method")
    alpha = lora_rules.run_alpha(cfg.alpha, cfg.scaling)
    model = build_model(run)
    for p in lora_rules.merged_prefixes(state):
        mU, mV = state[p + lora_rules.MERGED_U].detach().clone(), state[p + lora_rules.MERGED_V].detach().clone()
        set_submodule(model, p, FLoRALinear(_linear(model, p), 1, alpha, cfg.dropout, mU, mV))
    for p in lora_rules.adapter_prefixes(state):
        r = state[p + _B].shape[1]
        layer = LoRALinear(_linear(model, p), r=r, alpha=lora_rules.lora_scale(alpha, r) * r, dropout=cfg.dropout)
        with torch.no_grad():
            layer.adapter.U.copy_(state[p + _B])
            layer.adapter.V.copy_(state[p + _A])
        set_submodule(model, p, layer)
    return model


def _linear(model: nn.Module, p: str) -> nn.Linear:
    base = model.get_submodule(p)
    if type(base) is not nn.Linear:
        raise TypeError(f"adapter for {p!r}, which is {type(base).__name__}, not nn.Linear")
    return base
