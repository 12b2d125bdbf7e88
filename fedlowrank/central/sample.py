"""Sampling from the language models: :func:`generate` (temperature, top-k, a maximum of new tokens) for any
model mapping ``idx (B, T) -> logits (B, T, vocab)``, dense or factorized, and ``python main.py mode=sample``.

GPT-2 and LLaMA keep a key/value cache while the sequence fits in ``block_size``; beyond it (and for any other
model) the context is recomputed at every step, cropped to the last ``block_size`` tokens, as nanoGPT does."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from fedlowrank.models.gpt2 import GPT2
from fedlowrank.models.llama import Llama
from fedlowrank.config.sample import SampleConfig
from fedlowrank.schema import ConfigError, check_top_level, to_dataclass

if TYPE_CHECKING:
    from .trainer import Trainer

log = logging.getLogger(__name__)


def _pick(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> Tensor:
    """(B, vocab) logits -> (B, 1) next tokens: argmax at temperature 0, else a draw from the top-k softmax."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1).cpu(), 1, generator=generator).to(logits.device)


def _cacheable(model: nn.Module) -> bool:
    return isinstance(model, (GPT2, Llama))


@torch.no_grad()
def generate(model: nn.Module, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             generator: torch.Generator | None = None) -> Tensor:
    """Extend ``idx`` (B, T) by ``max_new_tokens`` sampled tokens -> (B, T + max_new_tokens). ``temperature`` 0
    picks the most likely token; ``top_k`` keeps the k most likely before sampling. GPT-2 and LLaMA (dense or
    factorized) use a key/value cache while the whole sequence fits in ``block_size``; otherwise (or for other
    models) the context is recomputed at every step, cropped to the last ``block_size`` tokens."""
    was_training = model.training
    model.eval()
    block = getattr(getattr(model, "config", None), "block_size", None)
    try:
        if _cacheable(model) and idx.size(1) + max_new_tokens <= block:  # type: ignore[operator]
            cache: list[dict] = [{} for _ in range(model.config.n_layer)]
            logits = model(idx, cache=cache)[:, -1]  # the prompt fills the cache
            for i in range(max_new_tokens):
                nxt = _pick(logits, temperature, top_k, generator).to(idx.device)
                idx = torch.cat([idx, nxt], dim=1)
                if i + 1 < max_new_tokens:
                    logits = model(nxt, cache=cache)[:, -1]  # one token, attending to every cached one
            return idx
        for _ in range(max_new_tokens):
            ctx = idx if block is None else idx[:, -block:]
            idx = torch.cat([idx, _pick(model(ctx)[:, -1], temperature, top_k, generator).to(idx.device)], dim=1)
        return idx
    finally:
        model.train(was_training)


def tb_sample(tr: "Trainer") -> str:
    """A text sample continuing the start of the eval split, to TensorBoard (``samples/text``). Every process
    runs it (FSDP2 forwards are collective) with its own generator, so the training RNG is untouched."""
    prompt = tr.data.val[: max(1, min(16, tr.t.block_size // 2))].unsqueeze(0).to(tr.env.device)
    with tr.autocast():
        out = generate(tr.model, prompt, tr.t.sample_tokens, 0.8, 50, torch.Generator().manual_seed(tr.step))
    text = tr.data.decode(out[0].tolist()) if tr.data.decode is not None else " ".join(map(str, out[0].tolist()))
    if tr.writer:
        tr.writer.add_text("samples/text", text, tr.step)
    return text


def load_for_sampling(src: Path):
    """(model, tokenizer) from a central run directory, a checkpoint directory or a Hugging Face directory: the
    dense equivalent of the stored model, and the run's tokenizer (bytes when the model's vocabulary is 256)."""
    from fedlowrank.checkpoint import CheckpointError
    from fedlowrank.data.text import BPETokenizer, ByteTokenizer
    from fedlowrank.export import load_any
    from fedlowrank.models.hf import PretrainedError

    if not src.is_dir():
        raise ConfigError(f"ckpt={str(src)!r} is not a directory (a run, a checkpoint or a Hugging Face directory)")
    try:
        model, _, tok_dir = load_any(src)
    except (PretrainedError, CheckpointError) as e:  # the user's files, named: exit 2, nothing sampled
        raise ConfigError(str(e)) from None
    if tok_dir is None and (src / "tokenizer.json").is_file():
        tok_dir = src
    if tok_dir is not None:
        return model, BPETokenizer(str(tok_dir))
    if model.config.vocab_size in (256, 257):
        return model, ByteTokenizer()
    raise ConfigError(f"{src} has no tokenizer.json and the model's vocabulary ({model.config.vocab_size}) is not "
                      "the byte tokenizer's (256)")


def run(cfg: DictConfig) -> list[str]:
    """``python main.py mode=sample ckpt=<dir> sample.prompt=...``: log and return the samples."""
    check_top_level(cfg, {"seed", "out_dir", "model", "data", "strategy", "method", "sample", "ckpt", "run_mode"},
                    "sample")
    sc = to_dataclass(SampleConfig, cfg.get("sample") or {}, "sample")
    sc.validate()
    if not cfg.get("ckpt"):
        raise ConfigError("mode=sample needs ckpt=<run directory, checkpoint directory or Hugging Face directory>")
    model, tok = load_for_sampling(Path(str(cfg.ckpt)))
    ids = tok.encode(sc.prompt)
    if not ids:
        raise ConfigError("sample.prompt encodes to no tokens")
    g = torch.Generator().manual_seed(sc.seed)
    idx = torch.tensor([ids] * sc.num_samples, dtype=torch.long)
    out = generate(model, idx, sc.max_new_tokens, sc.temperature, sc.top_k, g)
    texts = [tok.decode(row.tolist()) for row in out]
    for i, t in enumerate(texts):
        log.info("sample %d:\n%s", i, t)
    return texts
