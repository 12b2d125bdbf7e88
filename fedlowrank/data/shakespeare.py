"""Federated Shakespeare, LEAF style: next-character prediction, one client per speaking role.

``tinyshakespeare.txt`` (or any text in its format: a speaker line ``NAME:`` followed by the
speech, blocks separated by blank lines) is split into speeches; each role's speeches are joined
and cut into non-overlapping windows of ``seq_len`` characters: x = window, y = window shifted by
one (every position predicts its next character). Each role keeps a random ``test_fraction`` of its
windows as its own held-out split (LEAF's per-user sample split), so personalised and global
accuracy are both measured on text the clients never trained on.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .partition import holdout_mask, natural_split

log = logging.getLogger(__name__)
_SPEAKER = re.compile(r"^([A-Z][A-Za-z' .,&-]*):$")


@dataclass
class RoleText:
    """Windows of every role. x, y: (N, seq_len) int64; role: (N,) role index; test: (N,) bool."""

    x: torch.Tensor
    y: torch.Tensor
    role: np.ndarray
    test: np.ndarray
    roles: list[str]
    vocab: str  # the characters, in id order ("" when a tokenizer encodes the text)
    n_tokens: int | None = None  # the tokenizer's vocabulary size

    @property
    def vocab_size(self) -> int:
        return self.n_tokens if self.n_tokens is not None else len(self.vocab)


def parse_roles(text: str) -> dict[str, str]:
    """Role name -> its speeches joined by newlines, in order. Blocks without a speaker line
    continue the previous speech."""
    speeches: dict[str, list[str]] = {}
    last = None
    for block in re.split(r"\n\s*\n", text):
        first, _, rest = block.strip("\n").partition("\n")
        m = _SPEAKER.match(first.strip())
        if m and rest.strip():
            last = m.group(1)
            speeches.setdefault(last, []).append(rest)
        elif last is not None and block.strip():
            speeches[last].append(block.strip("\n"))
    return {r: "\n".join(s) for r, s in speeches.items()}


def load_role_text(path: str | Path, seq_len: int = 80, test_fraction: float = 0.1, seed: int = 0,
                   tokenizer: str | None = None) -> RoleText:
    """Windows of every role found in the file at ``path`` (see module docstring): of characters, or of the
    tokens of ``tokenizer`` (a :func:`fedlowrank.data.text.make_tokenizer` spec, e.g. a checkpoint's)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data.path={str(path)!r} is not a file (tinyshakespeare.txt or text in its format)")
    if seq_len < 2:
        raise ValueError(f"data.seq_len must be >= 2, got {seq_len}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"data.test_fraction must be in (0, 1), got {test_fraction}")
    text = p.read_text(encoding="utf-8")
    roles = parse_roles(text)
    if not roles:
        raise ValueError(f"{path}: no speaker lines ('NAME:' followed by a speech) found")
    encode, vocab, n_tokens = _encoder(text, tokenizer)
    names = sorted(roles)
    xs, ys, rid = [], [], []
    for i, name in enumerate(names):
        ids = encode(roles[name])
        n = (len(ids) - 1) // seq_len
        if n == 0:
            continue
        xs.append(ids[: n * seq_len].view(n, seq_len))
        ys.append(ids[1: n * seq_len + 1].view(n, seq_len))
        rid.append(np.full(n, i))
    role = np.concatenate(rid)
    test = holdout_mask(role, test_fraction, seed)  # per-role held-out windows
    return RoleText(torch.cat(xs), torch.cat(ys), role, test, names, vocab, n_tokens)


def _encoder(text: str, tokenizer: str | None):
    """(encode: str -> int64 ids, characters, tokenizer vocabulary size or None)."""
    if tokenizer is not None:
        from .text import make_tokenizer

        tok = make_tokenizer(tokenizer)
        return lambda t: torch.tensor(tok.encode(t), dtype=torch.int64), "", tok.vocab_size
    vocab = "".join(sorted(set(text)))
    points = np.frombuffer(vocab.encode("utf-32-le"), dtype=np.uint32)  # sorted code points

    def encode(t: str) -> torch.Tensor:
        codes = np.frombuffer(t.encode("utf-32-le"), dtype=np.uint32)
        return torch.from_numpy(np.searchsorted(points, codes).astype(np.int64))

    return encode, vocab, None


def natural_partitions(data: RoleText, num_clients: int, min_size: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(train, test) index arrays per client: one role each (:func:`fedlowrank.data.partition.natural_split`:
    the ``num_clients`` roles with the most training windows, each with at least ``min_size``)."""
    return natural_split(data.role, data.test, num_clients, min_size, "roles", "training windows")
