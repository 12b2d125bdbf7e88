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
    rng = np.random.default_rng(seed)
    test = np.zeros(len(role), dtype=bool)
    for i in np.unique(role):  # per-role held-out windows; roles with one window keep it for training
        idx = np.flatnonzero(role == i)
        k = int(round(test_fraction * len(idx)))
        test[rng.choice(idx, size=k, replace=False)] = True
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
    """(train, test) index arrays per client: one role each, via flwr-datasets' NaturalIdPartitioner.

    Roles with fewer than ``min_size`` training windows are left out; the ``num_clients`` roles with
    the most training windows are kept (ties broken by name). Asking for more clients than there are
    roles is an error, raised before any training.
    """
    from datasets import Dataset
    from datasets import utils as hf_tqdm
    from flwr_datasets.partitioner import NaturalIdPartitioner

    train_idx = np.flatnonzero(~data.test)
    counts = np.bincount(data.role[train_idx], minlength=len(data.roles))
    eligible = [r for r in np.argsort(-counts, kind="stable") if counts[r] >= max(1, min_size)]
    if num_clients > len(eligible):
        raise ValueError(f"natural partition: {num_clients} clients requested but only {len(eligible)} roles have "
                         f">= {min_size} training windows (fed.min_partition_size); lower fed.num_clients")
    keep = sorted(int(r) for r in eligible[:num_clients])
    mine = train_idx[np.isin(data.role[train_idx], keep)]
    part = NaturalIdPartitioner(partition_by="role")
    part.dataset = Dataset.from_dict({"idx": mine, "role": data.role[mine]})
    by_role = {}
    quiet = not hf_tqdm.are_progress_bars_disabled()
    if quiet:
        hf_tqdm.disable_progress_bars()
    try:
        for pid in range(part.num_partitions):
            rows = part.load_partition(pid)
            by_role[int(rows["role"][0])] = np.asarray(rows["idx"])
    finally:
        if quiet:
            hf_tqdm.enable_progress_bars()
    test_idx = np.flatnonzero(data.test)
    train = [by_role[r] for r in keep]
    test = [test_idx[data.role[test_idx] == r] for r in keep]
    log.info("natural partition: %d roles, %d-%d training windows each", len(keep),
             min(len(t) for t in train), max(len(t) for t in train))
    return train, test
