"""Parameter, FLOP and byte accounting."""
from __future__ import annotations

import torch
from torch import nn

from .layers import LowRankMixin


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_flops(model: nn.Module, *inputs: torch.Tensor, backward: bool = False) -> int:
    """FLOPs of one forward (and optionally backward) pass, via ``torch.utils.flop_counter`` (imported here: it
    imports triton, ~0.2 s in every process that only trains)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        out = model(*inputs)
        if backward:
            (out if isinstance(out, torch.Tensor) else out[0]).float().sum().backward()
    return int(counter.get_total_flops())


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes of a tensor dict as sent on the wire (numel × element size)."""
    return sum(t.numel() * t.element_size() for t in state.values())


def size_mb(model: nn.Module) -> float:
    """The model's size in MB (2**20 bytes): its parameters and buffers (BatchNorm statistics) as stored."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())) / 2**20


def compression_summary(model: nn.Module) -> dict[str, float]:
    """Parameters the model stores (``params``) against the plain dense model it stands for (``params_if_dense``):
    there a factorized layer counts as its dense out x in weight, and a LoRA adapter (with its learned scale) is
    extra, its frozen base being the dense layer itself."""
    from .lora import LoRALinear

    adapters = [m for m in model.modules() if isinstance(m, LoRALinear)]
    inside = {id(a.adapter) for a in adapters}
    extra = sum(p.numel() for a in adapters for p in a.adapter_parameters())
    dense = fact = 0
    for m in model.modules():
        if isinstance(m, LowRankMixin) and id(m) not in inside:
            dense += m.dense_params()
            fact += m.factor_params()
    total = count_params(model)
    plain = total - fact + dense - extra
    return {"params": total, "factorized_params": fact, "dense_equiv_params": dense, "adapter_params": extra,
            "params_if_dense": plain, "ratio": total / max(1, plain)}
