"""Text corpora and tokenizers for language-model pretraining.

Offline default: Python's own documentation text (``pydoc_data.topics``) with a byte-level
tokenizer (vocab 256). Real runs: WikiText-103 / C4 via HF ``datasets`` with the GPT-2 BPE
tokenizer (``tokenizers``); both need the internet once and fail with a clear error offline.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedlowrank.schema import ConfigError

log = logging.getLogger(__name__)


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocab 256, lossless, needs nothing."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class BPETokenizer:
    """A ``tokenizers`` tokenizer: a ``tokenizer.json`` file, a directory holding one (a checkpoint's), or a hub
    name such as ``gpt2`` (downloaded once)."""

    def __init__(self, name: str = "gpt2") -> None:
        from tokenizers import Tokenizer

        path = Path(name).expanduser()
        path = path / "tokenizer.json" if path.is_dir() else path
        if path.is_file():
            try:
                self.tok = Tokenizer.from_file(str(path))
            except Exception as e:  # the Rust parser's error: malformed JSON, an unknown model or field
                raise ConfigError(f"{path}: not a tokenizers tokenizer ({str(e)[:200]})") from None
        elif Path(name).expanduser().exists() or name.count("/") > 1 or name.startswith((".", "/", "~")) \
                or name.endswith(".json"):  # a local path, not a hub id
            raise ConfigError(f"tokenizer {name!r}: no such file (a tokenizer.json, a directory holding one, "
                              "or a hub name such as gpt2)")
        else:
            try:
                self.tok = Tokenizer.from_pretrained(name)
            except Exception as e:
                raise ConfigError(f"could not load the tokenizer {name!r} from the Hugging Face hub ({str(e)[:200]}); "
                                  "it is downloaded on first use: connect once, give a tokenizer.json, or use "
                                  "data.tokenizer=byte") from None
        self.vocab_size = self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids))


def train_bpe(texts: list[str], vocab_size: int, special_tokens: tuple[str, ...] = (), path: str | Path | None = None):
    """A byte-level BPE (GPT-2's scheme: every byte in the alphabet, so any text encodes) trained offline on
    ``texts``; saved as a ``tokenizer.json`` at ``path`` when given. Returns the ``tokenizers.Tokenizer``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                                       show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if path is not None:
        tok.save(str(path))
    return tok


def make_tokenizer(spec: str) -> ByteTokenizer | BPETokenizer:
    """``byte``, or a ``tokenizers`` tokenizer (file, directory or hub name; see :class:`BPETokenizer`)."""
    return ByteTokenizer() if spec == "byte" else BPETokenizer(spec)


def pydoc_text() -> str:
    """~466 kB of English/Python prose that ships with CPython."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def hf_text(name: str, max_chars: int | None) -> tuple[str, str]:
    """(train, validation) text of a HF dataset; clear error when offline."""
    try:
        from datasets import load_dataset

        if name == "wikitext103":
            ds = load_dataset("wikitext", "wikitext-103-raw-v1")
            tr, va = ds["train"]["text"], ds["validation"]["text"]
        elif name == "c4":
            tr = load_dataset("allenai/c4", "en", split="train", streaming=True)
            va = load_dataset("allenai/c4", "en", split="validation", streaming=True)
            limit = max_chars or 50_000_000

            def take(it, n):
                out, size = [], 0
                for row in it:
                    out.append(row["text"])
                    size += len(row["text"])
                    if size >= n:
                        break
                return out

            tr, va = take(tr, limit), take(va, max(1, limit // 100))
        else:
            raise ValueError(name)
    except ValueError:
        raise
    except Exception as e:
        raise RuntimeError(f"could not load dataset {name!r} from the Hugging Face hub ({e}); "
                           "it needs internet access (or a populated HF cache). Offline, use data=pydoc.") from e
    tr_text, va_text = "\n".join(tr), "\n".join(va)
    if max_chars:
        tr_text = tr_text[:max_chars]
    return tr_text, va_text


@dataclass
class TextData:
    train: torch.Tensor  # (N,) int64 token ids
    val: torch.Tensor  # (M,) int64
    vocab_size: int
    decode: Callable[[list[int]], str] | None = None  # token ids -> text (samples)


def _read(path: str | Path, what: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what}: text file {p} not found")
    return p.read_text(encoding="utf-8")


def load_text_data(name: str, tokenizer: str = "byte", path: str | None = None, val_fraction: float = 0.1,
                   max_chars: int | None = None, cache_dir: str | None = None, train_path: str | None = None,
                   eval_path: str | None = None) -> TextData:
    """Tokenized train/val streams. ``name``: pydoc | shakespeare | file | textfile | wikitext103 | c4 | tokens
    (``path``: a shard directory, memory-mapped).

    ``textfile``: your own corpus, ``train_path`` (required) and an optional held-out
    ``eval_path``; without it the last ``val_fraction`` of the train file is held out.
    """
    tok = make_tokenizer(tokenizer)
    if name == "tokens":  # memory-mapped shards: nothing is read into RAM here
        from .shards import open_split, read_meta

        d = Path(str(path))
        meta = read_meta(d)
        return TextData(open_split(d, meta, "train"), open_split(d, meta, "val"),  # type: ignore[arg-type]
                        int(meta["vocab_size"]), tok.decode)
    if name == "textfile":
        if not train_path:
            raise ValueError("data=textfile needs data.train_path")
        text = _read(train_path, "data.train_path")
        if max_chars:
            text = text[:max_chars]
        ids = np.asarray(tok.encode(text), dtype=np.int64)
        if eval_path:
            train, val = ids, np.asarray(tok.encode(_read(eval_path, "data.eval_path")), dtype=np.int64)
        else:
            n_val = max(1, int(len(ids) * val_fraction))
            train, val = ids[:-n_val], ids[-n_val:]
    elif name in ("pydoc", "shakespeare", "file"):
        if name == "pydoc":
            text = pydoc_text()
        else:
            from .fetch import shakespeare_path

            text = _read(shakespeare_path(path), "data.path")  # unset: the Shakespeare corpus, as before
        if max_chars:
            text = text[:max_chars]
        ids = np.asarray(tok.encode(text), dtype=np.int64)
        n_val = max(1, int(len(ids) * val_fraction))
        train, val = ids[:-n_val], ids[-n_val:]
    elif name in ("wikitext103", "c4"):
        cache = Path(cache_dir) / f"{name}_{tokenizer}_{max_chars}.npz" if cache_dir else None
        if cache is not None and cache.is_file():
            z = np.load(cache)
            train, val = z["train"], z["val"]
        else:
            tr, va = hf_text(name, max_chars)
            train, val = np.asarray(tok.encode(tr), dtype=np.int64), np.asarray(tok.encode(va), dtype=np.int64)
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                np.savez(cache, train=train, val=val)
    else:
        raise ValueError(f"unknown text dataset {name!r} (pydoc|shakespeare|file|textfile|wikitext103|c4)")
    return TextData(torch.from_numpy(train), torch.from_numpy(val), tok.vocab_size, tok.decode)


def check_splits(data: TextData, block_size: int, source: str) -> None:
    """Reject a split too short for one ``block_size`` window, naming it (before any training)."""
    for split, ids in (("train", data.train), ("eval", data.val)):
        if len(ids) <= block_size + 1:
            raise ConfigError(f"the {split} split of {source} has {len(ids)} tokens, fewer than one window of "
                             f"trainer.block_size + 1 = {block_size + 1}: give more text or a smaller block_size")


def eval_windows(tokens: torch.Tensor, block_size: int) -> torch.Tensor:
    """Start offsets of the non-overlapping ``block_size`` windows covering the split."""
    return torch.arange(0, len(tokens) - block_size - 1 + 1, block_size)


def get_batch(tokens: torch.Tensor, batch_size: int, block_size: int, seed: int, step: int,
              rank: int = 0, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows, a pure function of (seed, step, rank, micro): resuming reproduces batches.

    Returns x, y: (batch_size, block_size) int64, y shifted by one.
    """
    if len(tokens) <= block_size + 1:
        raise ValueError(f"corpus of {len(tokens)} tokens is shorter than block_size {block_size} + 1")
    g = torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1009 + rank) * 101 + micro)
    ix = torch.randint(len(tokens) - block_size - 1, (batch_size,), generator=g)
    x = torch.stack([tokens[i: i + block_size] for i in ix.tolist()])
    y = torch.stack([tokens[i + 1: i + 1 + block_size] for i in ix.tolist()])
    return x, y
