"""The key/value cache of generation, shared by GPT-2 and LLaMA: a dict per layer holding the keys and values
(B, H_kv, T_so_far, head_dim) of every position seen so far."""
from __future__ import annotations

import torch
from torch import Tensor


def extend_cache(cache: dict | None, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, bool]:
    """Generation's key/value cache of one layer: append this step's k, v (B, Hkv, T, hd) to the earlier ones and
    return all of them, with whether attention must be causal (the prompt) or not (one new token sees all)."""
    if cache is None:
        return k, v, True
    if "k" in cache:
        if k.shape[2] != 1:
            raise ValueError("after the prompt, feed the cached model one token at a time")
        k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
    causal = "k" not in cache
    cache["k"], cache["v"] = k, v
    return k, v, causal
