"""Tokenize a corpus into memory-mapped token shards for ``data=tokens data.dir=<out>``.

    python -m fedlowrank.data.prepare --out <dir> --tokenizer <byte | gpt2 | tokenizer.json | dir> FILE [FILE ...]
    python -m fedlowrank.data.prepare --out <dir> --tokenizer gpt2 --dataset allenai/c4 --config en --streaming

Every document is encoded whole by the tokenizer's own ``encode`` (its special tokens included, e.g. a LLaMA-style
``<s>`` once at the start) and followed by one end-of-text token when the tokenizer has one, so the shards hold
exactly ``encode(document) + [eos]`` per document, never a token split or a special token at an arbitrary cut.
A text file is cut once, at the first line end past ``1 - --val-fraction`` of its bytes: the part before is one
training document, the part after one held-out document (each file is read whole: give a large corpus as many
files or as a dataset). A Hugging Face dataset is read row by row, a row a document (``--streaming`` for a large
one); its validation split is ``--val-split`` when given, else every document whose index hashes below
``--val-fraction``. Documents are tokenized on ``--workers`` processes, in order (the shards do not depend on the
worker count), and appended to ``uint16`` (vocabulary < 65 536) or ``uint32`` shards of at most
``--shard-tokens``. ``meta.json`` records the tokenizer, the vocabulary size, the dtype and the token count of
every shard; a BPE tokenizer is saved beside the shards."""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import logging
import multiprocessing as mp
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from fedlowrank.schema import ConfigError

from .shards import META

log = logging.getLogger("fedlowrank.data.prepare")
EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")


@functools.lru_cache(maxsize=2)
def _tokenizer(spec: str):
    from .text import make_tokenizer

    return make_tokenizer(spec)


def eos_id(spec: str) -> int | None:
    tok = _tokenizer(spec)
    if spec == "byte":
        return None
    return next((i for n in EOS_NAMES if (i := tok.tok.token_to_id(n)) is not None), None)


def _encode(task: tuple[str, str, str]) -> tuple[str, np.ndarray]:
    """(split, token ids as uint32) of one whole document: the tokenizer's own encode, then end-of-text."""
    spec, split, text = task
    eos = eos_id(spec)
    return split, np.asarray(_tokenizer(spec).encode(text) + ([eos] if eos is not None else []), dtype=np.uint32)


def file_documents(paths: list[Path], val_fraction: float) -> Iterator[tuple[str, str]]:
    """(split, document) of each file: its text up to the first line end at or past (1 - val_fraction) of its
    bytes (train), then the rest (val), each read whole."""
    for p in paths:
        cut = int(p.stat().st_size * (1 - val_fraction))
        try:
            with p.open("r", encoding="utf-8", newline="") as f:
                train, done = [], 0
                for line in f:
                    train.append(line)
                    done += len(line.encode("utf-8"))
                    if done >= cut:
                        break
                rest = f.read()
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not UTF-8 text ({e.reason} near byte {e.start:,} of a chunk)") from None
        yield "train", "".join(train)
        if rest:
            yield "val", rest


def dataset_documents(name: str, config: str | None, split: str, field: str, streaming: bool, val_split: str | None,
                   val_fraction: float, max_docs: int | None) -> Iterator[tuple[str, str]]:
    """(split, document) rows of a Hugging Face dataset (needs the internet once)."""
    try:
        from datasets import load_dataset

        sources = [("train", load_dataset(name, config, split=split, streaming=streaming))]
        if val_split:
            sources.append(("val", load_dataset(name, config, split=val_split, streaming=streaming)))
    except Exception as e:
        raise RuntimeError(f"could not open dataset {name!r} ({type(e).__name__}: {e}); it needs internet access "
                           "or a populated Hugging Face cache") from e
    for which, ds in sources:
        for i, row in enumerate(ds):
            if max_docs is not None and i >= max_docs:
                break
            held = which == "val" or (not val_split and ((i * 2654435761) % 2**32) / 2**32 < val_fraction)
            yield ("val" if held else "train"), row[field]


class ShardWriter:
    """Appends tokens to ``<split>_<n>.bin`` files of at most ``shard_tokens`` tokens each."""

    def __init__(self, out: Path, split: str, dtype: type, shard_tokens: int) -> None:
        self.out, self.split, self.dtype, self.cap = out, split, dtype, shard_tokens
        self.shards: list[dict] = []

    def write(self, ids: np.ndarray) -> None:
        ids = ids.astype(self.dtype, copy=False)
        while len(ids):
            if not self.shards or self.shards[-1]["tokens"] >= self.cap:
                self.shards.append({"file": f"{self.split}_{len(self.shards):06d}.bin", "tokens": 0})
                (self.out / self.shards[-1]["file"]).write_bytes(b"")
            cur = self.shards[-1]
            take = ids[: self.cap - cur["tokens"]]
            with (self.out / cur["file"]).open("ab") as f:
                f.write(take.tobytes())
            cur["tokens"] += len(take)
            ids = ids[len(take):]


def prepare(docs: Iterator[tuple[str, str]], out: Path, spec: str, workers: int, shard_tokens: int,
            sources: list[str]) -> dict:
    """Tokenize ``docs`` on ``workers`` processes into shards under ``out``; returns (and writes) meta.json."""
    out.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(spec)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    writers = {s: ShardWriter(out, s, dtype, shard_tokens) for s in ("train", "val")}
    tasks = ((spec, split, text) for split, text in docs)
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers) if workers > 1 else _Serial() as pool:
        # a window of 2 documents per worker: Pool.imap would read the whole corpus ahead into its queue
        while window := list(itertools.islice(tasks, 2 * workers)):
            for split, ids in pool.imap(_encode, window, chunksize=1):
                writers[split].write(ids)
    if spec != "byte":
        tok.tok.save(str(out / "tokenizer.json"))
    meta = {"format": 1, "tokenizer": "byte" if spec == "byte" else "tokenizer.json", "tokenizer_source": spec,
            "vocab_size": tok.vocab_size, "dtype": np.dtype(dtype).name, "eos_id": eos_id(spec), "sources": sources,
            "splits": {s: {"tokens": sum(sh["tokens"] for sh in w.shards), "shards": w.shards}
                       for s, w in writers.items()}}
    (out / META).write_text(json.dumps(meta, indent=2))
    return meta


class _Serial:
    """``Pool.imap`` in this process (``--workers 1``)."""

    def __enter__(self) -> "_Serial":
        return self

    def __exit__(self, *exc) -> None:
        return None

    @staticmethod
    def imap(fn, it, chunksize: int = 1):
        return map(fn, it)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fedlowrank.data.prepare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", type=Path, help="UTF-8 text files")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokenizer", default="byte", help="byte | a hub name (gpt2) | tokenizer.json | its directory")
    ap.add_argument("--dataset", help="a Hugging Face dataset instead of files (e.g. allenai/c4)")
    ap.add_argument("--config", default=None)
    ap.add_argument("--split", default="train")
    ap.add_argument("--val-split", default=None, help="the dataset's held-out split (e.g. validation)")
    ap.add_argument("--text-field", default="text")
    ap.add_argument("--streaming", action="store_true", help="stream the dataset (large corpora)")
    ap.add_argument("--max-docs", type=int, default=None)
    ap.add_argument("--val-fraction", type=float, default=0.01)
    ap.add_argument("--workers", type=int, default=max(1, (mp.cpu_count() or 2) - 1))
    ap.add_argument("--shard-tokens", type=int, default=100_000_000)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    bad = [str(f) for f in a.files if not f.is_file()]
    if bool(a.files) == bool(a.dataset) or bad or not 0 < a.val_fraction < 1 or a.workers < 1 or a.shard_tokens < 1:
        log.error("give text files or --dataset (not both); files must exist (missing: %s); --val-fraction in "
                  "(0, 1); --workers and --shard-tokens >= 1", bad or "none")
        return 2
    try:
        _tokenizer(a.tokenizer)
        docs = file_documents(a.files, a.val_fraction) if a.files else dataset_documents(
            a.dataset, a.config, a.split, a.text_field, a.streaming, a.val_split, a.val_fraction, a.max_docs)
        meta = prepare(docs, a.out, a.tokenizer, a.workers, a.shard_tokens,
                       [str(f) for f in a.files] or [f"{a.dataset}:{a.config}:{a.split}"])
    except (ConfigError, RuntimeError, OSError, UnicodeDecodeError) as e:
        log.error("prepare failed: %s", e)
        return 2
    log.info("wrote %s: %d train / %d val tokens (%s, vocabulary %d)", a.out, meta["splits"]["train"]["tokens"],
             meta["splits"]["val"]["tokens"], meta["dtype"], meta["vocab_size"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
