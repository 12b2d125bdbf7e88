import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# node-side fed-data cache: one fresh directory per test session, never the user's ~/.cache
os.environ["FEDLOWRANK_CACHE_DIR"] = tempfile.mkdtemp(prefix="fedlowrank-cache-")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
