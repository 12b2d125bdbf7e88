"""A SuperLink and N SuperNodes on 127.0.0.1 (``--insecure``, free ports) for tests and benchmarks of
the deployed apps; ``flwr_run`` submits this project to it. The SuperLink starter and the process
supervision are the simulation runtime's (:mod:`fedlowrank.runtime.superlink`); every process runs in its
own session and, on exit, exactly those sessions are stopped. Nodes get ``FEDLOWRANK_CACHE_DIR`` (the
node cache, :mod:`.cache`) under ``workdir`` unless ``env`` names one."""
from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from fedlowrank.federated.run_config import CACHE_ENV
from fedlowrank.runtime.superlink import BIN, PROJECT, Loopback, free_port, start_superlink, stop, wait_port


@contextlib.contextmanager
def loopback_deployment(n: int, workdir: Path, env: dict[str, str] | None = None, warm: bool = False,
                        node_poll_s: float | None = None) -> Iterator[Loopback]:
    """Start a SuperLink and ``n`` SuperNodes (the server assigns their partitions) with their logs in
    ``workdir``, and a Flower config (``workdir/flwr_home``) naming the connection ``loopback``. ``warm``:
    each node runs ``--isolation process`` beside a :mod:`.warmexec` process that forks its ClientApps;
    ``node_poll_s``: nodes run through :mod:`.fastnode`, polling the SuperLink that often (Flower: 3 s)."""
    workdir = Path(workdir)
    env = {CACHE_ENV: str(workdir / "node_cache"), **(env or {})}
    link, full_env, start, procs = start_superlink(workdir, "loopback", env, simulation=False)
    node = ([sys.executable, "-m", "fedlowrank.deploy.fastnode", "--poll-s", str(node_poll_s), "--"]
            if node_poll_s else [str(BIN / "flower-supernode")])
    try:
        wait_port(link, 60)
        for i in range(n):
            port = free_port()
            start([*node, "--insecure", "--superlink", f"127.0.0.1:{link}", "--port",
                   str(port), *(["--isolation", "process"] if warm else [])], f"node{i}.log")
            if warm:
                start([sys.executable, "-m", "fedlowrank.deploy.warmexec", "--insecure", "--runtime-api-address",
                       f"127.0.0.1:{port}", "--parent-pid", str(procs[-1].pid)], f"warmexec{i}.log")
        yield Loopback(workdir, full_env, procs)
    finally:
        stop(procs)


def flwr_run(lb: Loopback, overrides: str, out_dir: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``flwr run <project> loopback --stream`` with Hydra ``overrides``; ``out_dir`` is relative to ``workdir``."""
    return subprocess.run([str(BIN / "flwr"), "run", str(PROJECT), lb.connection, "--stream", "--run-config",
                           f'overrides="{overrides}" out-dir="{out_dir}"'], cwd=lb.workdir, env=lb.env,
                          capture_output=True, text=True, timeout=timeout)
