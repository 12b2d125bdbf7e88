import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# the node cache (fedlowrank.deploy.cache) is off unless a test sets FEDLOWRANK_CACHE_DIR itself
os.environ.pop("FEDLOWRANK_CACHE_DIR", None)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def play(tmp_path):
    """A synthetic play (tests/test_fed_text.py, tests/deploy/): 6 roles with speeches of different lengths, in tinyshakespeare's format."""
    rng = np.random.default_rng(0)
    words = ["the", "king", "shall", "not", "be", "gone", "my", "lord", "sweet", "night", "and", "love"]
    blocks = []
    for i in range(120):
        role = ["ROMEO", "JULIET", "NURSE", "FRIAR LAURENCE", "TYBALT", "PAGE"][i % 6 if i % 5 else 0]
        blocks.append(f"{role}:\n" + " ".join(rng.choice(words, size=25 + 10 * (i % 6))) + ".")
    p = tmp_path / "play.txt"
    p.write_text("\n\n".join(blocks) + "\n")
    return p
