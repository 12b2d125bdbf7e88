"""Instruction data in the Dolly-15k layout (databricks/databricks-dolly-15k): one JSON object per line with
``instruction``, ``context``, ``response`` and ``category``. Each record becomes one example: the prompt (Alpaca's
template, as FlowerTune and FedIT use) followed by the response and end-of-text, tokenized by the model's
tokenizer and cut or padded to ``seq_len + 1`` tokens; x = tokens[:-1], y = tokens[1:], with every target that is
not a response token (the prompt, padding) set to IGNORE, so the loss and the perplexity are the response's only.
Clients: one per category (``fed.partition=natural``) or a Dirichlet mix over categories."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedlowrank.schema import ConfigError
from fedlowrank.training.loop import IGNORE

from .partition import holdout_mask

log = logging.getLogger(__name__)
FIELDS = ("instruction", "context", "response", "category")
HUB_ID = "databricks/databricks-dolly-15k"
MAX_LINE = 1 << 20  # a record longer than 1 MiB is refused


@dataclass
class InstructionData:
    """x, y: (N, seq_len) int64 (y IGNORE outside responses); category: (N,) index into ``categories``; test: (N,)
    bool, each category's held-out share."""

    x: torch.Tensor
    y: torch.Tensor
    category: np.ndarray
    categories: list[str]
    test: np.ndarray
    vocab_size: int


def prompt(rec: dict) -> str:
    """Alpaca's template (with an ``### Input:`` block only where the record has a context)."""
    head = ("Below is an instruction that describes a task{}. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\n{}\n\n").format(", paired with an input that provides further context"
                                                           if rec["context"] else "", rec["instruction"])
    return head + (f"### Input:\n{rec['context']}\n\n" if rec["context"] else "") + "### Response:\n"


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a Dolly-layout JSONL file; a missing field, a non-string value or a malformed line is an
    error naming the line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"data.path={str(path)!r} is not a file (JSONL in the Dolly-15k layout: {', '.join(FIELDS)})")
    out = []
    with p.open("r", encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if len(line) > MAX_LINE:
                raise ConfigError(f"{p}:{i}: a record longer than {MAX_LINE} characters")
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{p}:{i}: not JSON ({e.msg})") from None
            out.append(_checked(rec, f"{p}:{i}"))
    if not out:
        raise ConfigError(f"{p}: no records")
    return out


def _checked(rec, where: str) -> dict:
    if not isinstance(rec, dict) or any(not isinstance(rec.get(k), str) for k in FIELDS):
        raise ConfigError(f"{where}: a record needs string fields {', '.join(FIELDS)}")
    return {k: rec[k] for k in FIELDS}


def hub_records() -> list[dict]:
    """The Dolly-15k records from the Hugging Face Hub (``datasets``; downloaded once, then cached)."""
    try:
        from datasets import load_dataset

        ds = load_dataset(HUB_ID, split="train")
    except Exception as e:  # offline, or the hub refused: one clear line
        raise ConfigError(f"could not load {HUB_ID} from the Hugging Face Hub ({type(e).__name__}: {str(e)[:160]}); "
                          "it is downloaded once: connect, or give a local JSONL with data.source=local "
                          "data.path=<file>") from None
    return [_checked(dict(r), f"{HUB_ID}[{i}]") for i, r in enumerate(ds)]


def encode(records: list[dict], tokenizer, eos: int | None, seq_len: int, test_fraction: float, seed: int
           ) -> InstructionData:
    """Tokenized examples (see the module docstring); records whose prompt leaves no response token inside
    ``seq_len`` are dropped (counted in the log)."""
    cats = sorted({r["category"] for r in records})
    xs, ys, cat, dropped = [], [], [], 0
    for r in records:
        p = tokenizer.encode(prompt(r))
        ids = (p + tokenizer.encode(r["response"]) + ([eos] if eos is not None else []))[: seq_len + 1]
        if len(ids) <= len(p):
            dropped += 1
            continue
        t = torch.tensor(ids + [0] * (seq_len + 1 - len(ids)), dtype=torch.int64)
        y = t[1:].clone()
        y[: len(p) - 1] = IGNORE  # targets inside the prompt
        y[len(ids) - 1:] = IGNORE  # padding
        xs.append(t[:-1])
        ys.append(y)
        cat.append(cats.index(r["category"]))
    if not xs:
        raise ConfigError(f"no record has a response token within data.seq_len={seq_len}; raise it")
    if dropped:
        log.info("instructions: %d of %d records dropped (the prompt fills data.seq_len=%d)", dropped, len(records),
                 seq_len)
    category = np.asarray(cat)
    test = holdout_mask(category, test_fraction, seed)  # each category's held-out share
    return InstructionData(torch.stack(xs), torch.stack(ys), category, cats, test, tokenizer.vocab_size)
