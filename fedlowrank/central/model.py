"""The central run's language model: GPT-2 or LLaMA from the config, factorized per ``model.lowrank``."""
from __future__ import annotations

from torch import nn

from fedlowrank.config.central import CentralRun
from fedlowrank.lowrank import factorize
from fedlowrank.models.gpt2 import GPT2, GPT2Config
from fedlowrank.models.llama import Llama, LlamaConfig


def build_lm(run: CentralRun, vocab_size: int) -> nn.Module:
    """Dense GPT-2/LLaMA, factorized per ``model.lowrank`` (fixed budget or InRank's start rank)."""
    m, t = run.model, run.trainer
    if m.arch == "gpt2":
        model: nn.Module = GPT2(GPT2Config.from_size(m.size, vocab_size=vocab_size, block_size=t.block_size,
                                                     dropout=m.dropout))
    else:
        model = Llama(LlamaConfig.from_size(m.size, vocab_size=vocab_size, block_size=t.block_size))
    if m.lowrank == "fixed":
        factorize(model, rank=m.rank, ratio=m.ratio, targets=m.targets, skip=m.skip)
    elif m.lowrank == "inrank":
        ir = run.inrank()
        factorize(model, rank=ir.init_rank + ir.buffer, targets=m.targets, skip=m.skip)  # type: ignore[union-attr]
    return model
