"""Token shards on disk: a directory of raw ``uint16``/``uint32`` token files and a ``meta.json`` (written by
:mod:`fedlowrank.data.prepare`), read through memory maps, so a corpus of any size costs no RAM beyond the pages
a batch touches. :class:`ShardedTokens` looks like a 1-D int64 tensor to the trainer: ``len`` and slices."""
from __future__ import annotations

import json
from bisect import bisect_right
from pathlib import Path

import numpy as np
import torch

from fedlowrank.schema import ConfigError

META = "meta.json"
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


class ShardedTokens:
    """Shards of one split as one sequence. ``t[a:b]`` -> int64 tensor (b - a,), crossing shard boundaries."""

    def __init__(self, files: list[Path], dtype: np.dtype) -> None:
        self.maps = [np.memmap(f, dtype=dtype, mode="r") for f in files if f.stat().st_size > 0]
        self.starts = [0]
        for m in self.maps:
            self.starts.append(self.starts[-1] + len(m))

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, s: slice) -> torch.Tensor:
        if not isinstance(s, slice) or s.step not in (None, 1):
            raise TypeError("ShardedTokens supports contiguous slices only")
        a, b, _ = s.indices(len(self))
        parts = []
        while a < b:
            i = bisect_right(self.starts, a) - 1
            lo = a - self.starts[i]
            hi = min(b, self.starts[i + 1]) - self.starts[i]
            parts.append(np.asarray(self.maps[i][lo:hi], dtype=np.int64))
            a += hi - lo
        return torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64))


def read_meta(d: Path) -> dict:
    """``meta.json`` of a shard directory, every field checked: the vocabulary an integer within the dtype's range
    (it sizes the model's embedding), the dtype one of :data:`DTYPES`, each split a list of ``{file, tokens}``."""
    path = d / META
    try:
        meta = json.loads(path.read_text())
        splits = [meta["splits"][s]["shards"] for s in ("train", "val")]
        vocab, dtype = meta["vocab_size"], meta["dtype"]
    except RecursionError:
        raise ConfigError(f"{path}: JSON nested too deeply") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: not a token-shard directory written by python -m fedlowrank.data.prepare "
                          f"({type(e).__name__}: {e})") from None
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ConfigError(f"{path}: dtype {str(dtype)[:40]!r} is not one of {sorted(DTYPES)}")
    top = min(1 << 24, np.iinfo(DTYPES[dtype]).max + 1)
    if type(vocab) is not int or not 1 <= vocab <= top:
        raise ConfigError(f"{path}: vocab_size={str(vocab)[:40]!r} must be an integer in [1, {top:,}] for {dtype}")
    if meta.get("tokenizer", "byte") not in ("byte", "tokenizer.json"):
        raise ConfigError(f"{path}: tokenizer={str(meta.get('tokenizer'))[:40]!r} must be 'byte' or 'tokenizer.json' "
                          "(the file beside the shards)")
    for shards in splits:
        if not isinstance(shards, list) or not all(isinstance(sh, dict) and isinstance(sh.get("file"), str) and
                                                   type(sh.get("tokens")) is int and sh["tokens"] >= 0 for sh in shards):
            raise ConfigError(f"{path}: splits.*.shards must be lists of {{file, tokens}} (tokens an integer >= 0)")
    return meta


def open_split(d: Path, meta: dict, split: str) -> ShardedTokens:
    """The split's shards, checked against the token counts ``meta.json`` records (a truncated shard is named)."""
    dtype = DTYPES[meta["dtype"]]
    files = []
    for sh in meta["splits"][split]["shards"]:
        f = d / sh["file"]
        if Path(sh["file"]).name != sh["file"] or not f.is_file():
            raise ConfigError(f"{d / META}: shard {sh['file']!r} is missing from {d}")
        if f.stat().st_size != int(sh["tokens"]) * np.dtype(dtype).itemsize:
            raise ConfigError(f"{f}: {f.stat().st_size} bytes, but meta.json records {sh['tokens']} tokens")
        files.append(f)
    return ShardedTokens(files, dtype)
