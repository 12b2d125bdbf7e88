"""``python main.py mode=federated``: heterogeneous-rank clients on Flower's simulation runtime (a private
SuperLink in simulation mode, clients on Ray), or with ``fed.runtime=simulation`` on the deprecated in-process
``run_simulation``."""
from __future__ import annotations

import logging
import os

from omegaconf import DictConfig

from fedlowrank.config import federated_run_from_cfg

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    """Validate ``cfg`` (errors before any training), run the simulation, return the summary."""
    fr = federated_run_from_cfg(cfg)
    if fr.fed.runtime == "superlink":
        check_superlink_runtime()
    check_partitions(fr)
    os.makedirs(fr.out_dir, exist_ok=True)
    if fr.fed.runtime == "superlink":
        return run_on_superlink(fr, cfg)
    import torch
    from flwr.simulation import run_simulation

    from clients.client_app import make_client_app
    from server.server_app import make_server_app

    cuda = torch.cuda.is_available()
    backend = {
        "client_resources": {"num_cpus": fr.fed.client_cpus, "num_gpus": fr.fed.client_gpus if cuda else 0.0},
        "init_args": {"num_cpus": os.cpu_count() or 1, "num_gpus": torch.cuda.device_count() if cuda else 0,
                      "include_dashboard": False, "logging_level": logging.WARNING},
    }
    results: dict = {}
    log.info("federated run: strategy=%s clients=%d rounds=%d budgets=%s out=%s", fr.strategy, fr.fed.num_clients,
             fr.fed.rounds, fr.fed.ranks or fr.fed.rank_ratios, fr.out_dir)
    from fedlowrank.federated import reaper

    watchdog = reaper.start()  # a killed run takes its Ray processes with it
    try:
        run_simulation(server_app=make_server_app(fr, results), client_app=make_client_app(fr),
                       num_supernodes=fr.fed.num_clients, backend_config=backend)
    finally:
        reaper.stop(watchdog)
    if "error" in results:
        raise RuntimeError(f"federated run failed: {results['error']} (logs in {fr.out_dir})")
    if not results:
        raise RuntimeError(f"federated simulation produced no result; see the log above and {fr.out_dir}")
    return results


def run_on_superlink(fr, cfg: DictConfig) -> dict:
    """The same apps on Flower's non-deprecated simulation runtime: a private SuperLink in simulation mode
    on a free loopback port (stopped afterwards), ``flwr run`` of this project with the resolved config
    (written to ``<out_dir>/flwr_runtime/config.yaml``), and the summary read back from ``metrics.json``."""
    import json
    import subprocess
    import time
    from pathlib import Path

    import torch
    from omegaconf import OmegaConf

    from . import reaper
    from .deploy import TRUST_ENV
    from .loopback import BIN, PROJECT, simulation_superlink

    out = Path(fr.out_dir).resolve()
    work = out / "flwr_runtime"
    work.mkdir(parents=True, exist_ok=True)
    conf = work / "config.yaml"
    OmegaConf.save(with_absolute_paths(OmegaConf.merge(cfg, {"out_dir": str(out)}), Path.cwd()), conf, resolve=True)
    metrics, error = out / "metrics.json", out / "error.json"
    before = metrics.stat().st_mtime_ns if metrics.exists() else None
    error.unlink(missing_ok=True)
    gpus = fr.fed.client_gpus if torch.cuda.is_available() else 0.0
    fed = (f"num-supernodes={fr.fed.num_clients} client-resources-num-cpus={int(max(1, fr.fed.client_cpus))} "
           f"client-resources-num-gpus={gpus} init-args-num-cpus={os.cpu_count() or 1} "
           f"init-args-num-gpus={torch.cuda.device_count() if gpus else 0}")
    t0 = time.time()
    watchdog = None
    try:
        with simulation_superlink(work, env={TRUST_ENV: "1"}) as lb:
            watchdog = reaper.start(roots=tuple(p.pid for p in lb.procs))  # a killed main.py takes them along
            proc = subprocess.Popen([str(BIN / "flwr"), "run", str(PROJECT), lb.connection, "--stream",
                                     "--federation-config", fed, "--run-config", f'config-file="{conf}"'],
                                    cwd=work, env=lb.env)
            lost = wait_for_run(proc, lb.procs[0].pid)
    finally:
        reaper.stop(watchdog)
    fresh = metrics.exists() and metrics.stat().st_mtime_ns != before
    if error.exists():
        cause = json.loads(error.read_text())["error"]
        raise RuntimeError(f"federated run failed: {cause} (logs in {out})")
    if lost and not fresh:
        raise RuntimeError(f"the SuperLink's simulation process ended before the run finished (killed or crashed; "
                           f"see the log above); round checkpoints are in {out / 'checkpoints'}: "
                           "continue with fed.resume=auto")
    if not fresh or (proc.returncode != 0 and not lost):  # lost but fresh: the run ended, flwr run lingered
        raise RuntimeError(f"flwr run on the simulation SuperLink failed (exit {proc.returncode}, "
                           f"{'no new' if not fresh else 'a'} metrics.json); see the log above and "
                           f"{work / 'superlink.log'}")
    log.info("superlink runtime: %.1f s wall", time.time() - t0)
    return json.loads(metrics.read_text())


def with_absolute_paths(cfg: DictConfig, base) -> DictConfig:
    """``cfg`` with its relative file paths (``deploy.PATH_KEYS``: data.path, data.root, method.from_ckpt, ...)
    made absolute against ``base``: the apps run in the SuperLink's working directory, while the user (and the
    validation main.py already did) meant main.py's. ``cfg`` itself is not modified."""
    import os.path

    from omegaconf import OmegaConf

    from .deploy import PATH_KEYS

    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for key in PATH_KEYS:
        value = OmegaConf.select(out, key, default=None)
        if isinstance(value, str) and value and not os.path.isabs(value):
            OmegaConf.update(out, key, os.path.abspath(os.path.join(base, value)), merge=False)
    return out


def wait_for_run(proc, superlink_pid: int, grace: float = 10.0, poll: float = 0.5) -> bool:
    """Wait for ``flwr run`` (``proc``). The SuperLink notices a dead simulation process only after a
    heartbeat timeout (about a minute), and ``flwr run --stream`` waits that long, then exits 0; so once
    the SuperLink's ``flwr-simulation`` child is gone, ``flwr run`` gets ``grace`` seconds, then is stopped.
    Returns whether it had to be stopped."""
    import subprocess
    import time

    from . import reaper

    seen = gone_at = None
    while proc.poll() is None:
        alive = any("flwr-simulation" in reaper.cmdline(p) for p, _ in reaper.tree(superlink_pid) if p != superlink_pid)
        seen = seen or alive
        if seen and not alive:
            gone_at = gone_at or time.time()
            if time.time() - gone_at > grace:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                return True
        time.sleep(poll)
    return False


def check_superlink_runtime() -> None:
    """The SuperLink runtime submits this project (its ``pyproject.toml`` names the Flower apps) with the
    venv's ``flwr`` and ``flower-superlink``: refuse up front where either is missing."""
    from fedlowrank.config import ConfigError

    from .loopback import BIN, PROJECT

    pyproject = PROJECT / "pyproject.toml"
    if not pyproject.is_file() or "[tool.flwr.app" not in pyproject.read_text():
        raise ConfigError(f"fed.runtime=superlink submits the project checkout with `flwr run`, but {PROJECT} has no "
                          "pyproject.toml with [tool.flwr.app] (an installed, not cloned, fedlowrank?); run from a "
                          "clone or use fed.runtime=simulation")
    missing = [b for b in ("flwr", "flower-superlink") if not (BIN / b).exists()]
    if missing:
        raise ConfigError(f"fed.runtime=superlink needs {', '.join(missing)} beside {BIN / 'python'} (flwr[simulation] "
                          "installed in this environment); or use fed.runtime=simulation")


def check_partitions(fr) -> None:
    """Every client gets data under the configured partitioning, checked before Ray starts."""
    from fedlowrank.config import ConfigError
    from fedlowrank.federated.server import partition_sizes

    try:
        sizes = partition_sizes(fr)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"cannot partition data={fr.data.name} for fed.num_clients={fr.fed.num_clients} with "
                          f"fed.partition={fr.fed.partition} fed.min_partition_size={fr.fed.min_partition_size}: "
                          f"{e}") from e
    empty = [i for i, n in enumerate(sizes) if n < max(1, fr.fed.min_partition_size)]
    if empty:
        raise ConfigError(f"client(s) {empty[:10]} get fewer than max(1, fed.min_partition_size="
                          f"{fr.fed.min_partition_size}) examples (sizes {sizes[:10]}); lower fed.num_clients or "
                          "fed.min_partition_size")
