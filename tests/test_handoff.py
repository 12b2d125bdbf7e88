"""main.py hands its run's data to the runtime's processes (fedlowrank.federated.handoff): what they read back is
what was built, and anything else (another run's data, a damaged or planted file) is rebuilt instead."""
import numpy as np
import pytest
import torch

from fedlowrank.federated import handoff
from fedlowrank.federated import task as task_mod
from helpers import fed_run


@pytest.fixture
def built(tmp_path, monkeypatch):
    """A synthetic run's data written to a hand-over directory named by FEDLOWRANK_RUN_DATA."""
    run = fed_run(tmp_path, "data=synthetic", "fed.partition=natural", "fed.num_clients=7")
    fd, args = task_mod.fed_data(run), task_mod.data_args(run)
    dest = tmp_path / "handoff"
    handoff.write(fd, args, dest)
    monkeypatch.setenv(handoff.ENV, str(dest))
    task_mod._cached.cache_clear()
    yield run, fd, args, dest
    task_mod._cached.cache_clear()


def test_read_back_equals_what_was_built(built):
    run, fd, args, _ = built
    got = handoff.read(args, task_mod.FedData)
    assert torch.equal(got.x, fd.x) and torch.equal(got.y, fd.y) and got.num_classes == fd.num_classes
    assert all(np.array_equal(a, b) for a, b in zip(got.train_parts, fd.train_parts))
    assert all(np.array_equal(a, b) for a, b in zip(got.heldout_parts, fd.heldout_parts))
    assert all(torch.equal(a, b) for a, b in zip(got.test.tensors, fd.test.tensors))
    assert len(got.train_parts) == len(fd.train_parts) == 7


def test_a_process_with_the_env_uses_the_handed_over_tensors(built):
    """fed_data takes the hand-over when the key matches: marked values written under the run's key come back."""
    run, fd, args, dest = built
    marked = task_mod.FedData(fd.x + 1000.0, fd.y, fd.train_parts, fd.heldout_parts, fd.test, fd.num_classes)
    handoff.write(marked, args, dest)
    assert torch.equal(task_mod.fed_data(run).x, fd.x + 1000.0)


def test_another_runs_data_or_a_damaged_file_is_rebuilt(built, tmp_path, caplog):
    run, fd, args, dest = built
    other = fed_run(tmp_path / "o", "data=synthetic", "fed.partition=natural", "fed.num_clients=8")
    assert handoff.read(task_mod.data_args(other), task_mod.FedData) is None  # another key: silently not used
    (dest / "x.bin").write_bytes(b"\0" * 12)  # truncated
    assert handoff.read(args, task_mod.FedData) is None and "unusable" in caplog.text
    handoff.write(fd, args, dest)
    with np.load(dest / "train.npz") as z:
        sizes, flat = z["sizes"], z["flat"]
    np.savez(dest / "train.npz", flat=np.full(len(flat), 10**9), sizes=sizes)  # planted indices
    assert handoff.read(args, task_mod.FedData) is None
    assert torch.equal(task_mod.fed_data(run).x, fd.x)  # rebuilt instead
