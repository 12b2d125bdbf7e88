"""Tests use the library's in-process federated loop (no Ray)."""
from fedlowrank.federated.inprocess import InProcessGrid as FakeGrid  # noqa: F401
from fedlowrank.federated.inprocess import run_rounds  # noqa: F401
