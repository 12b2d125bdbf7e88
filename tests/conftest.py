import os
import sys
from pathlib import Path

# The README's command runs the suite on two xdist workers (-n 2), one intra-op thread each (torch, numpy's BLAS,
# and every subprocess a test starts, which inherit it): with a thread per core on each worker, two workers
# oversubscribed a 2-core machine and took longer than one (docs/results.md, "The test suite"). Set before torch
# is imported; a run's own settings (fed.client_cpus, spawned central workers) still apply.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

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
