"""Flower's non-deprecated simulation runtime, run privately: a ``flower-superlink --simulation`` on a free
loopback port (its working directory and log in ``<out_dir>/flwr_runtime``), this project submitted to it with
``flwr run`` and the resolved config, the summary read back from ``metrics.json``. Every process is started in
its own session and, on exit, exactly those sessions are stopped (SIGTERM, then SIGKILL after a grace period).
The SuperLink starter is shared with the deployment helpers in :mod:`fedlowrank.deploy.loopback`."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from fedlowrank.checkpoint import CheckpointError
from fedlowrank.schema import ConfigError

from . import reaper
from .logs import StreamRelay, relay_stream

if TYPE_CHECKING:
    from fedlowrank.config import FederatedRun

log = logging.getLogger(__name__)
BIN = Path(sys.executable).parent
PROJECT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float) -> None:
    """Return once something accepts connections on 127.0.0.1:``port``; TimeoutError after ``timeout``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def stop(procs: list[subprocess.Popen], grace: float = 20.0) -> None:
    """Stop what each (unreaped) process owns, itself included: SIGTERM, SIGKILL after ``grace`` seconds
    (:func:`reaper.stop_trees`: by (pid, start time), never by name or group alone); then reap them. Processes
    this one has reaped already are left out: their pids may have been reused."""
    procs = [p for p in procs if p.returncode is None]
    reaper.stop_trees([p.pid for p in procs], grace)
    for p in procs:
        p.wait(timeout=10)
    deadline = time.time() + 10
    while time.time() < deadline and any(reaper.group_alive(p.pid) for p in procs):
        time.sleep(0.2)


@dataclass
class Loopback:
    """A running SuperLink (and, for deployments, its SuperNodes): where it runs and how to reach it."""

    workdir: Path
    env: dict[str, str]
    procs: list[subprocess.Popen]
    connection: str = "loopback"


def start_superlink(workdir: Path, connection: str, env: dict[str, str] | None, simulation: bool,
                    ) -> tuple[int, dict[str, str], Callable[[list[str], str], None], list[subprocess.Popen]]:
    """(port, env, start, procs) for a SuperLink on a free loopback port, with a Flower config in
    ``workdir/flwr_home`` naming it ``connection``; ``start(args, log)`` runs a process in its own session."""
    home = workdir / "flwr_home"
    home.mkdir(parents=True, exist_ok=True)
    link = free_port()
    (home / "config.toml").write_text(f'[superlink.{connection}]\naddress = "127.0.0.1:{link}"\ninsecure = true\n')
    full_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "FLWR_HOME": str(home),
                "PYTHONUNBUFFERED": "1", **(env or {})}
    procs: list[subprocess.Popen] = []

    def start(args: list[str], log_name: str) -> None:
        with open(workdir / log_name, "w") as fh:
            procs.append(subprocess.Popen(args, cwd=workdir, env=full_env, start_new_session=True, stdout=fh,
                                          stderr=subprocess.STDOUT))

    mode = ["--simulation", "--isolation", "subprocess"] if simulation else []
    # The apps run in this venv: without the flag, flwr 1.41's SuperLink builds a fresh environment per run
    # with `uv sync` (25 s here, and a download of torch on a machine without uv's cache).
    start([str(BIN / "flower-superlink"), "--insecure", *mode, "--disable-runtime-dependency-installation",
           "--host", "127.0.0.1", "--port", str(link)], "superlink.log")
    return link, full_env, start, procs


@contextlib.contextmanager
def simulation_superlink(workdir: Path, env: dict[str, str] | None = None) -> Iterator[Loopback]:
    """A SuperLink in simulation mode (it runs the virtual SuperNodes itself, on Ray) on a free loopback
    port, its working directory and log in ``workdir``, and a Flower config naming the connection ``sim``.
    Stopped, with everything it started, on exit."""
    workdir = Path(workdir)
    # the SuperExec it starts polls for the submitted run every 1 s by default (flwr 1.41): 0.2 s here
    env = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2", **(env or {})}
    link, full_env, _, procs = start_superlink(workdir, "sim", env, simulation=True)
    try:
        wait_port(link, 60)
        yield Loopback(workdir, full_env, procs, connection="sim")
    finally:
        stop(procs)


def stage_project(dest: Path) -> Path:
    """Copy what the FAB holds (``pyproject.toml`` and its ``fab-include`` patterns) into a fresh ``dest`` and
    return it. ``flwr run`` walks every file under the directory it is given before filtering (a ``.venv``
    inside the checkout cost 12 s per run here); the staged copy has only the app's few hundred files."""
    import shutil
    import tomllib

    pyproject = PROJECT / "pyproject.toml"
    patterns = tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["fab-include"]
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    shutil.copy2(pyproject, dest / "pyproject.toml")
    for pattern in patterns:
        for f in PROJECT.glob(pattern):
            if f.is_file() and not f.is_symlink():
                target = dest / f.relative_to(PROJECT)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, target)
    return dest


def run_on_superlink(fr: FederatedRun, cfg: DictConfig) -> dict:
    """Run ``fr`` on a private simulation SuperLink; the resolved config goes to
    ``<out_dir>/flwr_runtime/config.yaml``, the summary comes back from ``metrics.json``."""
    return launch(prepare(fr, cfg))


def prepare(fr: FederatedRun, cfg: DictConfig) -> dict:
    """What :func:`launch` needs, as JSON-able values: the resolved config saved as
    ``<out_dir>/flwr_runtime/config.yaml`` (file paths made absolute) and the federation's resources."""
    import torch

    from fedlowrank.federated.run_config import TRUST_ENV

    out = Path(fr.out_dir).resolve()
    work = out / "flwr_runtime"
    work.mkdir(parents=True, exist_ok=True)
    conf = work / "config.yaml"
    OmegaConf.save(with_absolute_paths(OmegaConf.merge(cfg, {"out_dir": str(out)}), Path.cwd()), conf, resolve=True)
    gpus = fr.fed.client_gpus if torch.cuda.is_available() else 0.0
    fed = (f"num-supernodes={fr.fed.num_clients} client-resources-num-cpus={int(max(1, fr.fed.client_cpus))} "
           f"client-resources-num-gpus={gpus} init-args-num-cpus={os.cpu_count() or 1} "
           f"init-args-num-gpus={torch.cuda.device_count() if gpus else 0}")
    return {"out": str(out), "conf": str(conf), "federation": fed, "env": {TRUST_ENV: "1"}}


def written_again(path: Path) -> Callable[[], bool]:
    """A check that ``path`` has been written since now (a run's ``metrics.json``: its server's last write)."""
    before = path.stat().st_mtime_ns if path.exists() else None
    return lambda: path.exists() and path.stat().st_mtime_ns != before


def launch(spec: dict) -> dict:
    """A private SuperLink, ``flwr run`` of the staged project on :func:`prepare`'s config, and the summary from
    ``metrics.json`` (or the run's error raised). Imports no torch: inside the private network this is the whole
    job of its first process, which then stays small while the run lasts."""
    out = Path(spec["out"])
    work = out / "flwr_runtime"
    metrics, error = out / "metrics.json", out / "error.json"
    fresh = written_again(metrics)  # this run wrote metrics.json (the ServerApp's last write)
    error.unlink(missing_ok=True)
    watchdog, relay = None, StreamRelay()
    try:
        with simulation_superlink(work, env=spec["env"]) as lb:
            watchdog = reaper.start(roots=tuple(p.pid for p in lb.procs))  # a killed main.py takes them along
            app = stage_project(work / "app")
            proc = subprocess.Popen([str(BIN / "flwr"), "run", str(app), lb.connection, "--stream",
                                     "--federation-config", spec["federation"], "--run-config",
                                     f'config-file="{spec["conf"]}"'],
                                    cwd=work, env=lb.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
            lost = wait_for_run(proc, lb.procs[0].pid, relay=relay, complete=fresh)
            done = relay.summary_done.is_set() and fresh()  # the relay is joined: its flag is final
            if done:  # complete: Ray's processes take ~3 s to honour SIGTERM
                stop(lb.procs, grace=1.0)
    finally:
        reaper.stop(watchdog)
    _raise_on_failure(out, work, 0 if done else proc.returncode, lost, fresh())
    return json.loads(metrics.read_text())


def _raise_on_failure(out: Path, work: Path, returncode: int | None, lost: bool, fresh: bool) -> None:
    """The run's failure as a RuntimeError naming its cause (``error.json``), or nothing if it finished."""
    error = out / "error.json"
    if error.exists():
        cause = json.loads(error.read_text())["error"]
        kind = cause.split(":", 1)[0]
        if kind in ("ConfigError", "CheckpointError"):  # the user's config or files: exit 2, no traceback
            raise (ConfigError if kind == "ConfigError" else CheckpointError)(cause.split(": ", 1)[-1])
        raise RuntimeError(f"federated run failed: {cause} (logs in {out})")
    if lost and not fresh:
        raise RuntimeError(f"the SuperLink's simulation process ended before the run finished (killed or crashed; "
                           f"see the log above); round checkpoints are in {out / 'checkpoints'}: "
                           "continue with fed.resume=auto")
    if not fresh or (returncode != 0 and not lost):  # lost but fresh: the run ended, flwr run lingered
        raise RuntimeError(f"flwr run on the simulation SuperLink failed (exit {returncode}, "
                           f"{'no new' if not fresh else 'a'} metrics.json); see the log above and "
                           f"{work / 'superlink.log'}")


def with_absolute_paths(cfg: DictConfig, base) -> DictConfig:
    """``cfg`` with its relative file paths (``PATH_KEYS``: data.path, data.root, method.from_ckpt, ...)
    made absolute against ``base``: the apps run in the SuperLink's working directory, while the user (and the
    validation main.py already did) meant main.py's. ``cfg`` itself is not modified."""
    from fedlowrank.federated.run_config import PATH_KEYS  # here: launch() (no config import) never needs it

    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for key in PATH_KEYS:
        value = OmegaConf.select(out, key, default=None)
        if isinstance(value, str) and value and not os.path.isabs(value):
            OmegaConf.update(out, key, os.path.abspath(os.path.join(base, value)), merge=False)
    return out


def wait_for_run(proc: subprocess.Popen, superlink_pid: int, grace: float = 10.0, poll: float = 0.5,
                 relay: StreamRelay | None = None, complete: Callable[[], bool] = lambda: False,
                 settle: float = 0.1) -> bool:
    """Wait for ``flwr run`` (``proc``), relaying its output through ``relay`` (see :mod:`.logs`).

    The SuperLink notices a dead simulation process only after a heartbeat timeout (about a minute), and
    ``flwr run --stream`` waits that long, then exits 0; so once the SuperLink's ``flwr-simulation`` child is gone,
    ``flwr run`` gets ``grace`` seconds, then is stopped. Returns whether it had to be stopped that way.
    Once the relay has shown the run summary's last line and ``complete()`` holds (the run's outputs are on disk),
    nothing is left to wait for but Flower's own shutdown (3-4 s): ``flwr run`` gets ``settle`` seconds, then is
    stopped, and the caller stops the SuperLink."""
    relay = relay or StreamRelay()
    pump = relay_stream(proc.stdout, relay=relay) if proc.stdout is not None else None
    seen = gone_at = None
    try:
        while proc.poll() is None:
            if relay.summary_done.is_set() and complete():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=settle)
                reaper.terminate(proc)
                return False
            alive = any("flwr-simulation" in reaper.cmdline(p) for p, _ in reaper.tree(superlink_pid)
                        if p != superlink_pid)
            seen = seen or alive
            if seen and not alive:
                gone_at = gone_at or time.time()
                if time.time() - gone_at > grace:
                    reaper.terminate(proc)
                    return True
            if relay.summary_done.is_set():  # out, but the outputs not yet complete: no busy loop
                time.sleep(poll)
            relay.summary_done.wait(poll)
        return False
    finally:
        if pump is not None:
            pump.join(timeout=5)


def check_superlink_runtime() -> None:
    """The SuperLink runtime submits this project (its ``pyproject.toml`` names the Flower apps) with the
    venv's ``flwr`` and ``flower-superlink``: refuse up front where either is missing."""
    pyproject = PROJECT / "pyproject.toml"
    if not pyproject.is_file() or "[tool.flwr.app" not in pyproject.read_text():
        raise ConfigError(f"fed.runtime=superlink submits the project checkout with `flwr run`, but {PROJECT} has no "
                          "pyproject.toml with [tool.flwr.app] (an installed, not cloned, fedlowrank?); run from a "
                          "clone or use fed.runtime=simulation")
    missing = [b for b in ("flwr", "flower-superlink") if not (BIN / b).exists()]
    if missing:
        raise ConfigError(f"fed.runtime=superlink needs {', '.join(missing)} beside {BIN / 'python'} (flwr[simulation] "
                          "installed in this environment); or use fed.runtime=simulation")
