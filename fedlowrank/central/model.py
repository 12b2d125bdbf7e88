"""The central run's model: GPT-2 or LLaMA, or a zoo model (vision classifier, character LSTM or Transformer),
factorized per ``model.lowrank``."""
from __future__ import annotations

from torch import nn

from fedlowrank.config.central import CentralRun, ConfigError, LMConfig
from fedlowrank.lowrank import factorize
from fedlowrank.models.gpt2 import GPT2, GPT2Config
from fedlowrank.models.llama import Llama, LlamaConfig


def build_model(run: CentralRun, vocab_size: int | None) -> nn.Module:
    """The configured model, dense or factorized (``vocab_size``: the text task's; None for images)."""
    if isinstance(run.model, LMConfig):
        return build_lm(run, int(vocab_size or 0))
    from fedlowrank.models.build import dense_model

    m = run.model
    model = dense_model(m.model_dict(), run.data.name, vocab_size)
    if m.lowrank == "fixed":
        factorize(model, rank=m.rank, ratio=m.ratio, targets=m.targets, skip=m.skip, dense_first=m.dense_first,
                  init=m.init)
    return model


def build_lm(run: CentralRun, vocab_size: int) -> nn.Module:
    """Dense GPT-2/LLaMA (random, or ``model.pretrained``'s weights), factorized per ``model.lowrank`` (fixed
    budget or InRank's start rank; SVD of the dense weights)."""
    m, t = run.model, run.trainer
    assert isinstance(m, LMConfig)
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
    low = {"targets": m.targets, "skip": m.skip, "dense_first": m.dense_first, "init": m.init}
    if m.lowrank == "fixed":
        factorize(model, rank=m.rank, ratio=m.ratio, **low)
    elif m.lowrank == "inrank":
        ir = run.inrank()
        factorize(model, rank=ir.init_rank + ir.buffer, **low)  # type: ignore[union-attr]
    return model
