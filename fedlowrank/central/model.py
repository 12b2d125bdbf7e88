"""The central run's language model: GPT-2 or LLaMA from the config, factorized per ``model.lowrank``."""
from __future__ import annotations

from torch import nn

from fedlowrank.config.central import CentralRun, ConfigError
from fedlowrank.lowrank import factorize
from fedlowrank.models.gpt2 import GPT2, GPT2Config
from fedlowrank.models.llama import Llama, LlamaConfig


def build_lm(run: CentralRun, vocab_size: int) -> nn.Module:
    """Dense GPT-2/LLaMA (random, or ``model.pretrained``'s weights), factorized per ``model.lowrank`` (fixed
    budget or InRank's start rank; SVD of the dense weights)."""
    m, t = run.model, run.trainer
    model: nn.Module
    if m.pretrained:
        from fedlowrank.models.hf import load_pretrained

        model, _ = load_pretrained(m.pretrained, **({"dropout": m.dropout} if m.arch == "gpt2" else {}))
        if vocab_size > model.config.vocab_size:
            raise ConfigError(f"the tokenizer has {vocab_size} tokens, more than model.pretrained's vocabulary "
                              f"({model.config.vocab_size}): use the checkpoint's tokenizer (data.tokenizer=byte "
                              "picks it when the checkpoint has a tokenizer.json)")
    elif m.arch == "gpt2":
        model = GPT2(GPT2Config.from_size(m.size, vocab_size=vocab_size, block_size=t.block_size, dropout=m.dropout))
    else:
        model = Llama(LlamaConfig.from_size(m.size, vocab_size=vocab_size, block_size=t.block_size))
    if m.lowrank == "fixed":
        factorize(model, rank=m.rank, ratio=m.ratio, targets=m.targets, skip=m.skip)
    elif m.lowrank == "inrank":
        ir = run.inrank()
        factorize(model, rank=ir.init_rank + ir.buffer, targets=m.targets, skip=m.skip)  # type: ignore[union-attr]
    return model
