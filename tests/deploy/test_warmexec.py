"""The warm SuperExec's fork executor and the fast-polling Grid, without a deployment (the slow
deployment test runs both end to end)."""
import os
import time
from types import SimpleNamespace

import pytest

from fedlowrank.deploy import warmexec
from fedlowrank.federated.grid import PollingGrid

pytestmark = pytest.mark.timeout(60)


def _spec(task_type, task_id=7):
    from flwr.supercore.superexec.executor.types import ExecutionSpec

    return ExecutionSpec(task_type=task_type, runtime_api_address="127.0.0.1:1", token="tok", insecure=True,
                         root_certificates_path=None, runtime_dependency_install=False, parent_pid=None,
                         suppress_output=True, task_id=task_id)


def test_fork_executor_runs_clientapp_tasks_in_a_forked_child_and_reaps_it(tmp_path, monkeypatch):
    from flwr.supercore.constant import TaskType

    marker = tmp_path / "child.txt"
    warm_state = {"imported_in_parent": id(warmexec)}

    def fake_child(spec, pull_backoff_s=None):  # stands in for Flower's run_clientapp; sees the parent's memory (fork, not exec)
        marker.write_text(f"{os.getpid()} {spec.token} {warm_state['imported_in_parent'] == id(warmexec)}")
        return 3

    monkeypatch.setattr(warmexec, "_child", fake_child)
    ex = warmexec.ForkExecutor()
    assert ex.launch(_spec(TaskType.CLIENT_APP)).status == "accepted"
    assert len(ex.children) == 1
    deadline = time.time() + 20
    while ex.children and time.time() < deadline:
        ex.reconcile()
        time.sleep(0.05)
    assert not ex.children  # reaped: no zombie left behind
    pid, token, same_module = marker.read_text().split()
    assert int(pid) != os.getpid() and token == "tok" and same_module == "True"


def test_fork_executor_sends_other_task_types_to_flowers_subprocess_executor():
    from flwr.supercore.constant import TaskType

    ex = warmexec.ForkExecutor()
    seen = []
    ex.fallback = SimpleNamespace(launch=lambda spec: seen.append(spec.task_type) or "fallback")
    assert ex.launch(_spec(TaskType.SERVER_APP)) == "fallback" and seen == [TaskType.SERVER_APP]
    assert not ex.children


def test_fork_executor_close_stops_running_children():
    from flwr.supercore.constant import TaskType

    ex = warmexec.ForkExecutor()
    orig = warmexec._child
    warmexec._child = lambda spec, b=None: time.sleep(60) or 0
    try:
        ex.launch(_spec(TaskType.CLIENT_APP))
    finally:
        warmexec._child = orig
    (pid,) = ex.children
    t0 = time.time()
    ex.close()
    assert time.time() - t0 < 10 and not ex.children
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def test_warmexec_cli_refuses_tls_without_certificates():
    with pytest.raises(SystemExit):
        warmexec.main(["--runtime-api-address", "127.0.0.1:1"])


class FakeGrid:
    """Replies arrive on the ``ready``-th pull; counts pulls."""

    def __init__(self, ready: int):
        self.ready, self.pulls = ready, 0

    def push_messages(self, messages):
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        self.pulls += 1
        if self.pulls < self.ready:
            return []
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in sorted(ids)]

    def get_node_ids(self):
        return [1, 2]


def test_polling_grid_returns_every_reply_at_its_own_poll_interval():
    inner = FakeGrid(ready=5)
    g = PollingGrid(inner, poll_s=0.01)
    t0 = time.time()
    got = list(g.send_and_receive([object(), object(), object()], timeout=30))
    # Flower's deployed Grid sleeps 3 s between pulls: 4 sleeps would take 12 s
    assert time.time() - t0 < 2
    assert sorted(m.metadata.reply_to_message_id for m in got) == ["m0", "m1", "m2"] and inner.pulls == 5
    assert list(g.get_node_ids()) == [1, 2]  # delegated


def test_polling_grid_stops_at_the_timeout_with_what_it_has():
    inner = FakeGrid(ready=10**9)
    g = PollingGrid(inner, poll_s=0.02)
    t0 = time.time()
    assert list(g.send_and_receive([object()], timeout=0.3)) == []
    assert 0.25 < time.time() - t0 < 2 and inner.pulls >= 5
    with pytest.raises(ValueError):
        PollingGrid(inner, poll_s=0)


def test_fastnode_caps_only_the_supernode_loops_sleeps(monkeypatch):
    import time as real_time

    import flwr.supernode.start_client_internal as sci

    from fedlowrank.deploy import fastnode

    monkeypatch.setattr(sci, "time", real_time)  # undone after the test
    monkeypatch.setattr(sci, "pull_objects", sci.pull_objects)
    fastnode.cap_supernode_polls(0.05)
    assert sci.pull_objects.keywords == {"initial_backoff": 0.05, "backoff_cap": 1.0}
    from types import ModuleType

    assert not fastnode.retry_pulls_sooner(ModuleType("no_pulls"), "pull_objects", 0.05)  # nothing to rebind
    assert sci.time is not real_time and real_time.sleep is not sci.time.sleep
    t0 = real_time.perf_counter()
    sci.time.sleep(3)  # Flower's idle poll
    assert real_time.perf_counter() - t0 < 1
    assert sci.time.time() == pytest.approx(real_time.time(), abs=1)  # everything else is the time module
    with pytest.raises(SystemExit):  # patched twice / unknown loop: refuse rather than guess
        fastnode.cap_supernode_polls(0.05)
    with pytest.raises(ValueError):
        fastnode.cap_supernode_polls(0)


def test_reuse_installed_fab_returns_flowers_own_install_dir_without_unpacking(tmp_path, monkeypatch):
    """First message: Flower's installer runs; later ones get the same directory without it; another FAB, or
    an explicit install_dir, still goes through Flower."""
    import types
    from pathlib import Path

    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.install import install_from_fab

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    fab = build_fab_from_disk(Path(__file__).resolve().parents[2])
    calls = []

    def flower_install(fab_file, install_dir=None, skip_prompt=False):
        calls.append(install_dir)
        return install_from_fab(fab_file, install_dir, skip_prompt)

    rc = types.SimpleNamespace(install_from_fab=flower_install)
    assert warmexec.reuse_installed_fab(rc)
    first = rc.install_from_fab(fab, skip_prompt=True)
    assert len(calls) == 1 and (first / "clients" / "client_app.py").is_file()
    assert rc.install_from_fab(fab, skip_prompt=True) == first and len(calls) == 1
    other = fab + b"\0"  # still a readable zip, another hash: Flower installs it in a directory of its own
    assert rc.install_from_fab(other, skip_prompt=True) != first and len(calls) == 2
    rc.install_from_fab(fab, tmp_path / "elsewhere", True)
    assert calls[-1] == tmp_path / "elsewhere"
    assert not warmexec.reuse_installed_fab(types.SimpleNamespace())
