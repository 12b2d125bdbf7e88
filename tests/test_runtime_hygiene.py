"""The simulation engine's per-failure tracebacks are dropped (the strategy logs one line instead), and the
watchdog stops a private SuperLink's whole process tree, sessions included, when main.py is killed."""
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from fedlowrank.runtime import reaper
from fedlowrank.runtime.logs import EngineTracebackFilter, quiet_engine_tracebacks


def _record(path: str, func: str, level: int = logging.ERROR) -> logging.LogRecord:
    rec = logging.LogRecord("flwr", level, path, 1, "boom", None, None, func=func)
    return rec


def test_engine_filter_drops_only_the_engines_per_message_errors():
    f = EngineTracebackFilter()
    site = "/venv/lib/python3.11/site-packages/flwr/server/superlink/fleet/vce/"
    assert not f.filter(_record(site + "vce_api.py", "worker"))
    assert not f.filter(_record(site + "backend/raybackend.py", "process_message"))
    # the same files' other functions, other levels and other files still get through
    assert f.filter(_record(site + "vce_api.py", "start_vce"))
    assert f.filter(_record(site + "vce_api.py", "worker", logging.WARNING))
    assert f.filter(_record("/x/server/strategy.py", "worker"))


def test_engine_filter_installs_once_and_silences_a_real_logger_call(capsys):
    logger = logging.getLogger("flwr.test_hygiene")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    handler = logging.StreamHandler(sys.stdout)
    logger.addHandler(handler)
    try:
        quiet_engine_tracebacks(logger)
        quiet_engine_tracebacks(logger)
        assert sum(isinstance(f, EngineTracebackFilter) for f in logger.filters) == 1
        # a module whose path ends like the engine's: its ERROR from worker() is dropped, INFO is kept
        ns: dict = {"logger": logger, "ERROR": logging.ERROR, "INFO": logging.INFO}
        code = compile(textwrap.dedent("""
            def worker():
                logger.log(ERROR, "Traceback (most recent call last): ...")
                logger.log(INFO, "still here")
        """), "/site-packages/flwr/server/superlink/fleet/vce/vce_api.py", "exec")
        exec(code, ns)
        ns["worker"]()
        logger.error("strategy line")
    finally:
        logger.removeHandler(handler)
    out = capsys.readouterr().out
    assert "Traceback" not in out and "still here" in out and "strategy line" in out


CHILD = """
import os, subprocess, sys, time
# a root in its own session (like flower-superlink) whose child starts yet another session (like its SuperExec)
root = subprocess.Popen([sys.executable, "-c",
    "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], "
    "start_new_session=True); time.sleep(300)"], start_new_session=True)
sys.path.insert(0, {src!r})
from fedlowrank.runtime import reaper
reaper.start(roots=(root.pid,))
print(root.pid, flush=True)
time.sleep(300)
"""


@pytest.mark.timeout(120)
def test_watchdog_stops_the_roots_tree_when_its_owner_is_killed():
    src = os.path.dirname(os.path.dirname(os.path.abspath(reaper.__file__)))
    owner = subprocess.Popen([sys.executable, "-c", CHILD.format(src=os.path.dirname(src))], stdout=subprocess.PIPE,
                             text=True, start_new_session=True)
    root = int(owner.stdout.readline())
    deadline = time.time() + 20
    while len(reaper.tree(root)) < 2 and time.time() < deadline:
        time.sleep(0.2)
    tree = reaper.tree(root)
    assert len(tree) == 2 and len({os.getsid(p) for p, _ in tree}) == 2  # two sessions under the root
    os.kill(owner.pid, signal.SIGKILL)
    owner.wait()
    deadline = time.time() + 30
    while any(reaper._stat(p) is not None for p, _ in tree) and time.time() < deadline:
        time.sleep(0.3)
    assert all(reaper._stat(p) is None for p, _ in tree), "the root's tree outlived its owner"


def test_stop_tree_leaves_unrelated_processes_alone():
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        assert reaper.stop_trees([victim.pid], grace=5) == 0  # SIGTERM sufficed: nothing needed SIGKILL
        victim.wait(timeout=10)
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


@pytest.mark.timeout(60)
def test_wait_for_run_stops_flwr_run_soon_after_the_simulation_process_dies():
    """``flwr run --stream`` would wait for the SuperLink's heartbeat timeout; once the SuperLink's
    ``flwr-simulation`` child is gone it gets ``grace`` seconds. A run that ends by itself is left alone."""
    from fedlowrank.runtime.superlink import wait_for_run

    # a stand-in SuperLink whose child carries flwr-simulation in its command line and dies after 1 s
    link = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; subprocess.Popen([sys.executable, "
                             "'-c', 'import time; time.sleep(1)', 'flwr-' + 'simulation']); time.sleep(60)"],
                            start_new_session=True)
    try:
        flwr_run = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        t0 = time.time()
        assert wait_for_run(flwr_run, link.pid, grace=1.0, poll=0.1)
        assert flwr_run.poll() is not None and time.time() - t0 < 15
        quick = subprocess.Popen([sys.executable, "-c", "pass"])
        assert not wait_for_run(quick, link.pid, grace=1.0, poll=0.1)  # ended on its own: not "lost"
    finally:
        link.kill()
        link.wait()


@pytest.mark.timeout(60)
def test_wait_for_run_stops_flwr_run_once_the_summary_is_relayed_and_the_outputs_are_complete():
    """After the summary's last line has been relayed and ``complete()`` holds, ``flwr run`` gets ``settle``
    seconds and is stopped (Flower's own shutdown took 3-4 s of every run); while ``complete()`` does not hold, the
    same line stops nothing, the wait keeps polling (no busy loop) and the run ends on its own."""
    from fedlowrank.runtime.superlink import wait_for_run

    link = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    script = ("import sys, time; print('INFO fedlowrank.federated.server:   tensorboard --logdir /x', flush=True); "
              "time.sleep(float(sys.argv[1]))")
    try:
        stuck = subprocess.Popen([sys.executable, "-c", script, "60"], stdout=subprocess.PIPE, text=True)
        t0 = time.time()
        assert not wait_for_run(stuck, link.pid, poll=0.1, complete=lambda: True, settle=0.2)
        assert stuck.poll() is not None and time.time() - t0 < 10
        ends = subprocess.Popen([sys.executable, "-c", script, "2"], stdout=subprocess.PIPE, text=True)
        t0, cpu0 = time.time(), time.process_time()
        assert not wait_for_run(ends, link.pid, poll=0.1, complete=lambda: False, settle=0.2)
        assert ends.returncode == 0 and time.time() - t0 > 1.5
        assert time.process_time() - cpu0 < 0.5 * (time.time() - t0)  # it polled; it did not spin
    finally:
        link.kill()
        link.wait()


def _zombie(pid: int, timeout: float = 10) -> None:
    deadline = time.time() + timeout
    while reaper._fields(pid)[0] != "Z" and time.time() < deadline:
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    return reaper._stat(pid) is not None


def _group_orphan():
    """A root (its own session) that exits at once, leaving a child in its process group."""
    root = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; print(subprocess.Popen([sys.executable, "
                             "'-c', 'import time; time.sleep(60)']).pid, flush=True)"],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    return root, int(root.stdout.readline())


def test_stop_trees_kills_what_is_left_in_an_unreaped_roots_group():
    """A root that exited but is not reaped yet still owns its pid and its group: what is left in the group is
    stopped (the loopback's SuperLink and node groups)."""
    root, orphan = _group_orphan()
    try:
        _zombie(root.pid)
        assert reaper.tree(root.pid) == [] and os.getpgid(orphan) == root.pid
        reaper.stop_trees([root.pid], grace=1)
        deadline = time.time() + 10
        while _alive(orphan) and time.time() < deadline:
            time.sleep(0.1)
        assert not _alive(orphan)
    finally:
        root.wait()
        try:
            os.kill(orphan, signal.SIGKILL)
        except OSError:
            pass


def test_a_reaped_roots_group_is_never_selected_by_group_alone():
    """Once a root is reaped its pid (and so its group id) may belong to anyone: a member of that group is not
    the root's to stop (here the orphan stands in for a process of a reused pid's group)."""
    root, orphan = _group_orphan()
    root.wait()
    try:
        reaper.stop_trees([root.pid], grace=1)
        time.sleep(0.5)
        assert _alive(orphan)
    finally:
        os.kill(orphan, signal.SIGKILL)


OWNER = """
import os, subprocess, sys, time
sys.path.insert(0, {src!r})
from fedlowrank.runtime import reaper
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])  # something the owner started
reaper.start()
print(child.pid, flush=True)
time.sleep(300)
"""
SHELL = """
import subprocess, sys
# a shell-like group leader: the owner and an unrelated process named like Ray share its process group
owner = subprocess.Popen([sys.executable, "-c", {owner!r}], stdout=subprocess.PIPE, text=True)
ray = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "/ray/raylet"])
print(owner.pid, owner.stdout.readline().strip(), ray.pid, flush=True)
owner.wait()
ray.wait()
"""


@pytest.mark.timeout(120)
def test_the_watchdog_kills_only_what_its_owner_started():
    """Killing the owner stops the process it started, but not an unrelated process in the owner's group that
    is named like Ray and started after the owner (the old watchdog selected those by group and name)."""
    src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(reaper.__file__))))
    owner_code = OWNER.format(src=src)
    shell = subprocess.Popen([sys.executable, "-c", SHELL.format(owner=owner_code)], stdout=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        owner, child, ray = map(int, shell.stdout.readline().split())
        assert os.getpgid(ray) == os.getpgid(owner)
        time.sleep(1.5)  # the watchdog has recorded the owner's tree
        os.kill(owner, signal.SIGKILL)
        deadline = time.time() + 30
        while _alive(child) and time.time() < deadline:
            time.sleep(0.2)
        assert not _alive(child), "the owner's own child outlived it"
        time.sleep(1)
        assert _alive(ray), "an unrelated process in the owner's group was killed"
    finally:
        try:
            os.killpg(shell.pid, signal.SIGKILL)
        except OSError:
            pass
        shell.wait()


def test_a_root_whose_start_time_changed_is_not_signalled():
    """The watchdog's roots carry the start time recorded at spawn; a pid that now starts at another time (a
    reused pid) is left alone."""
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        pid, started = reaper.identity(victim.pid)
        assert reaper.owned((0, 0), ((pid, started + 1),)) == set()
        assert (pid, started) in reaper.owned((0, 0), ((pid, started),))
        watchdog = subprocess.Popen([sys.executable, reaper.__file__, f"{os.getpid()}:{started}",
                                     f"{pid}:{started + 1}"])  # an owner identity that is already gone
        watchdog.wait(timeout=30)
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.timeout(60)
def test_an_isolated_run_is_ended_once_its_summary_is_relayed_and_its_outputs_are_complete():
    """fed.runtime=simulation in a private network: after the summary's last line and ``complete()``, the run's
    process is killed at once (its handlers would only begin run_simulation's ~3 s shutdown) and what it started
    gets SIGTERM; while ``complete()`` does not hold, nothing is stopped, the wait polls (no busy loop) and the
    run ends on its own."""
    from fedlowrank.runtime.logs import StreamRelay, relay_stream
    from fedlowrank.runtime.runner import wait_or_end

    # a stand-in run: starts a child in a session of its own (as Ray's processes), prints the summary's last line
    script = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; "
              "time.sleep(60)'], start_new_session=True); print(c.pid, flush=True); "
              "print('INFO fedlowrank.federated.server:   tensorboard --logdir /x', flush=True); "
              "time.sleep(float(sys.argv[1]))")

    def start(seconds: str) -> tuple[subprocess.Popen, StreamRelay, int]:
        proc = subprocess.Popen([sys.executable, "-c", script, seconds], stdout=subprocess.PIPE, text=True)
        child = int(proc.stdout.readline())
        relay = StreamRelay()
        relay_stream(proc.stdout, relay=relay)
        return proc, relay, child

    run, relay, child = start("60")
    t0 = time.time()
    assert wait_or_end(run, relay, complete=lambda: True, grace=5.0)
    assert run.returncode == -signal.SIGKILL and time.time() - t0 < 10
    _gone_or_zombie(child)
    run, relay, child = start("2")
    t0, cpu0 = time.time(), time.process_time()
    try:
        assert not wait_or_end(run, relay, complete=lambda: False)
        assert run.returncode == 0 and time.time() - t0 > 1.5 and _alive(child)  # ended by itself, nothing killed
        assert time.process_time() - cpu0 < 0.5 * (time.time() - t0)  # it polled; it did not spin
    finally:
        os.kill(child, signal.SIGKILL)


def _gone_or_zombie(pid: int, timeout: float = 10) -> None:
    deadline = time.time() + timeout
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(pid), f"process {pid} outlived the run's end"
