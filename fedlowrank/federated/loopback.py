"""A SuperLink and N SuperNodes on 127.0.0.1 (``--insecure``, free ports) for tests and benchmarks of
the deployed apps; ``flwr_run`` submits this project to it. Every process is started in its own
session and, on exit, exactly those sessions are stopped (SIGTERM, then SIGKILL after a grace period)."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent
PROJECT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def stop(procs: list[subprocess.Popen], grace: float = 20.0) -> None:
    """SIGTERM each process's own group, SIGKILL what is left of their process trees (and of the groups
    those trees had) after ``grace`` seconds, and reap them."""
    from .reaper import stop_trees

    stop_trees([p.pid for p in procs], grace)
    for p in procs:
        p.wait(timeout=10)
    deadline = time.time() + 10
    while time.time() < deadline and any(group_alive(p.pid) for p in procs):
        time.sleep(0.2)


@dataclass
class Loopback:
    workdir: Path
    env: dict[str, str]
    procs: list[subprocess.Popen]
    connection: str = "loopback"


def _superlink(workdir: Path, connection: str, env: dict[str, str] | None, simulation: bool):
    """(port, env, start) for a SuperLink on a free loopback port, with a Flower config in
    ``workdir/flwr_home`` naming it ``connection``; ``start(args, log)`` runs a process in its own session."""
    home = workdir / "flwr_home"
    home.mkdir(parents=True, exist_ok=True)
    link = free_port()
    (home / "config.toml").write_text(f'[superlink.{connection}]\naddress = "127.0.0.1:{link}"\ninsecure = true\n')
    full_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "FLWR_HOME": str(home),
                "PYTHONUNBUFFERED": "1", **(env or {})}
    procs: list[subprocess.Popen] = []

    def start(args: list[str], log: str) -> None:
        with open(workdir / log, "w") as fh:
            procs.append(subprocess.Popen(args, cwd=workdir, env=full_env, start_new_session=True, stdout=fh,
                                          stderr=subprocess.STDOUT))

    mode = ["--simulation", "--isolation", "subprocess"] if simulation else []
    # The apps run in this venv: without the flag, flwr 1.41's SuperLink builds a fresh environment per run
    # with `uv sync` (25 s here, and a download of torch on a machine without uv's cache).
    start([str(BIN / "flower-superlink"), "--insecure", *mode, "--disable-runtime-dependency-installation",
           "--host", "127.0.0.1", "--port", str(link)], "superlink.log")
    return link, full_env, start, procs


@contextlib.contextmanager
def loopback_deployment(n: int, workdir: Path, env: dict[str, str] | None = None, warm: bool = False,
                        node_poll_s: float | None = None) -> Iterator[Loopback]:
    """Start a SuperLink and ``n`` SuperNodes (``partition-id=i num-partitions=n``) with their logs in
    ``workdir``, and a Flower config (``workdir/flwr_home``) naming the connection ``loopback``. ``warm``:
    each node runs ``--isolation process`` beside a :mod:`.warmexec` process that forks its ClientApps;
    ``node_poll_s``: nodes run through :mod:`.fastnode`, polling the SuperLink that often (Flower: 3 s)."""
    workdir = Path(workdir)
    link, full_env, start, procs = _superlink(workdir, "loopback", env, simulation=False)
    node = ([sys.executable, "-m", "fedlowrank.federated.fastnode", "--poll-s", str(node_poll_s), "--"]
            if node_poll_s else [str(BIN / "flower-supernode")])
    try:
        wait_port(link, 60)
        for i in range(n):
            port = free_port()
            start([*node, "--insecure", "--superlink", f"127.0.0.1:{link}", "--port",
                   str(port), *(["--isolation", "process"] if warm else []),
                   "--node-config", f"partition-id={i} num-partitions={n}"], f"node{i}.log")
            if warm:
                start([sys.executable, "-m", "fedlowrank.federated.warmexec", "--insecure", "--runtime-api-address",
                       f"127.0.0.1:{port}", "--parent-pid", str(procs[-1].pid)], f"warmexec{i}.log")
        yield Loopback(workdir, full_env, procs)
    finally:
        stop(procs)


@contextlib.contextmanager
def simulation_superlink(workdir: Path, env: dict[str, str] | None = None) -> Iterator[Loopback]:
    """A SuperLink in simulation mode (Flower's non-deprecated simulation runtime: it runs the virtual
    SuperNodes itself, on Ray) on a free loopback port, its working directory and log in ``workdir``, and a
    Flower config naming the connection ``sim``. Stopped, with everything it started, on exit."""
    workdir = Path(workdir)
    link, full_env, _, procs = _superlink(workdir, "sim", env, simulation=True)
    try:
        wait_port(link, 60)
        yield Loopback(workdir, full_env, procs, connection="sim")
    finally:
        stop(procs)


def flwr_run(lb: Loopback, overrides: str, out_dir: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``flwr run <project> loopback --stream`` with Hydra ``overrides``; ``out_dir`` is relative to ``workdir``."""
    return subprocess.run([str(BIN / "flwr"), "run", str(PROJECT), lb.connection, "--stream", "--run-config",
                           f'overrides="{overrides}" out-dir="{out_dir}"'], cwd=lb.workdir, env=lb.env,
                          capture_output=True, text=True, timeout=timeout)
