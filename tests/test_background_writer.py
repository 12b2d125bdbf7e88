"""Round checkpoints written on a background thread: in order, never lost at the end of a run, and a failed write
stops the run instead of vanishing with the thread."""
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from fedlowrank.checkpoint import BackgroundWriter, is_complete
from fedlowrank.federated import server
from fedlowrank.federated.run_config import compose_cfg
from fedlowrank.runtime.runner import run

COMMON = ["mode=federated", "fed.runtime=local", "fed.rounds=2", "fed.local_steps=2"]


@pytest.mark.timeout(30)
def test_jobs_run_in_order_while_the_caller_goes_on():
    w, done, release = BackgroundWriter(depth=8), [], threading.Event()
    seen = {}

    def first() -> None:  # blocks until the caller, already past submit, releases it
        seen["released"] = release.wait(timeout=10)
        done.append(0)

    w.submit(first)
    for i in range(1, 5):
        w.submit(lambda i=i: (time.sleep(0.01), done.append(i)))
    release.set()  # a synchronous submit would have run first() to its 10 s timeout before getting here
    w.close()
    assert seen["released"] is True and done == [0, 1, 2, 3, 4]


@pytest.mark.timeout(30)
def test_at_most_depth_jobs_wait_at_once():
    w = BackgroundWriter(depth=2)
    queued = []

    def job() -> None:
        time.sleep(0.05)

    for _ in range(6):
        w.submit(job)
        queued.append(len(w._jobs))
    w.close()
    assert max(queued) <= 2


@pytest.mark.timeout(30)
def test_a_failed_job_is_raised_by_the_next_submit_or_by_close():
    w = BackgroundWriter()

    def boom() -> None:
        raise OSError("No space left on device")

    w.submit(boom)
    time.sleep(0.2)
    with pytest.raises(OSError, match="No space left"):
        w.submit(lambda: None)
    w.close()
    w2 = BackgroundWriter()
    w2.submit(boom)
    with pytest.raises(OSError, match="No space left"):
        w2.close()


@pytest.mark.timeout(120)
def test_a_run_returns_only_after_its_last_round_checkpoint_is_on_disk(tmp_path, monkeypatch):
    """The last round's write is slow; when the run returns, that round's checkpoint is complete and
    ``last.safetensors`` is its model (bit for bit the same bytes as a synchronous save)."""
    real = server._write_round

    def slow(out, keep, rnd, files):
        time.sleep(1.0)
        real(out, keep, rnd, files)

    monkeypatch.setattr(server, "_write_round", slow)
    res = run(compose_cfg([*COMMON, f"out_dir={tmp_path}"]))
    ckpt = tmp_path / "checkpoints" / "round-000002"
    assert res["rounds"] == 2 and is_complete(ckpt)
    a, b = load_file(str(ckpt / "global.safetensors")), load_file(str(tmp_path / "checkpoints" / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (ckpt / "global.safetensors").read_bytes() == (tmp_path / "checkpoints" / "last.safetensors").read_bytes()


@pytest.mark.timeout(120)
def test_a_failed_checkpoint_write_stops_the_run(tmp_path, monkeypatch):
    def full_disk(out, keep, rnd, files):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(server, "_write_round", full_disk)
    with pytest.raises(Exception, match="No space left on device"):
        run(compose_cfg([*COMMON, f"out_dir={tmp_path}"]))
