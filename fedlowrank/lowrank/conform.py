"""Reshape a dense model's skeleton to the factors (and LoRA adapters) a saved state holds."""
from __future__ import annotations

import torch
from torch import nn

from .factorize import FACTORIZERS, set_submodule
from .layers import LowRankMixin
from .lora import LoRALinear


def conform_to_state(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Reshape a dense model's skeleton to match ``state`` before ``load_state_dict``:
    ``p.adapter.U/V`` keys turn ``p`` into a LoRALinear, other ``p.U/V`` pairs into a
    factorized layer of the dispatch table, each at the rank found in the tensors.
    Returns the names of the changed modules. Works for any model (keys decide, not types)."""
    changed = []
    for key in [k for k in state if k.endswith(".adapter.U")]:
        p = key[: -len(".adapter.U")]
        base = model.get_submodule(p)
        if not isinstance(base, nn.Linear):
            raise TypeError(f"state has an adapter for {p!r}, which is {type(base).__name__}, not nn.Linear")
        set_submodule(model, p, LoRALinear(base, r=state[key].shape[1]))
        changed.append(p)
    for key in [k for k in state if k.endswith(".U") and not k.endswith(".adapter.U")]:
        p = key[:-2]
        if f"{p}.V" not in state:
            continue
        dense = model.get_submodule(p)
        maker = FACTORIZERS.get(type(dense))
        if maker is None:
            if isinstance(dense, LowRankMixin):
                dense._replace_factors(state[f"{p}.U"].detach().clone(), state[f"{p}.V"].detach().clone())
                continue
            raise TypeError(f"state has factors for {p!r}, which is {type(dense).__name__}")
        layer = maker(dense, rank=1, spectral=False)  # a skeleton: its factors are replaced next (no SVD)
        layer._replace_factors(state[f"{p}.U"].detach().clone(), state[f"{p}.V"].detach().clone())
        set_submodule(model, p, layer)
        changed.append(p)
    return changed
