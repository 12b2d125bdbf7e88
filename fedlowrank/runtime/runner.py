"""``python main.py mode=federated``: heterogeneous-rank clients on Flower's simulation runtime (a private
SuperLink in simulation mode, clients on Ray), or with ``fed.runtime=simulation`` on the deprecated in-process
``run_simulation``. Validates first (errors before any training), then hands over to the runtime, inside a
private network namespace where it can (``fed.isolation``, :mod:`.private_net`)."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fedlowrank import stopping as stop
from fedlowrank.checkpoint import CheckpointError
from fedlowrank.config import ConfigError, FederatedRun, federated_run_from_cfg
from fedlowrank.federated.report import keep_matplotlib_in
from fedlowrank.federated.server import partition_sizes

from . import private_net, reaper
from .logs import StreamRelay
from .superlink import written_again

log = logging.getLogger(__name__)
_ERRORS: dict[str, type[Exception]] = {"ConfigError": ConfigError, "CheckpointError": CheckpointError}  # exit 2


def run(cfg: DictConfig) -> dict:
    """Validate ``cfg``, run the federated simulation on the configured runtime, log and return the summary."""
    keep_matplotlib_in(str(cfg.get("out_dir") or "."))
    fr = federated_run_from_cfg(cfg)
    if fr.fed.runtime == "superlink":
        from .superlink import check_superlink_runtime

        check_superlink_runtime()
    isolate = use_private_network(fr)
    check_batched(fr)
    check_partitions(fr)  # loads (downloads) the data here: the private network has no other network
    check_resume_state(fr)
    os.makedirs(fr.out_dir, exist_ok=True)
    log.info("federated run: strategy=%s clients=%d rounds=%d budgets=%s runtime=%s%s; output in %s", fr.strategy,
             fr.fed.num_clients, fr.fed.rounds, fr.fed.ranks or fr.fed.rank_ratios, fr.fed.runtime
             + (" (Flower's run_simulation, deprecated in flwr 1.41)" if fr.fed.runtime == "simulation" else ""),
             " in a private network" if isolate else "", os.path.abspath(fr.out_dir))
    t0 = time.time()
    with handed_over(fr):
        results = run_isolated(fr, cfg) if isolate else run_runtime(fr, cfg)
    log.info("%.1f s wall in all (start-up included); summary: %s", time.time() - t0,
             os.path.join(os.path.abspath(fr.out_dir), "metrics.json"))
    return results


@contextlib.contextmanager
def handed_over(fr: FederatedRun):
    """On the Flower runtimes (other processes), the data this process built for its checks goes to
    ``<out_dir>/flwr_runtime/data`` and ``FEDLOWRANK_RUN_DATA`` names it for them (:mod:`fedlowrank.federated.
    handoff`); not on the local runtime (this process) or a Ray cluster's other machines (``fed.ray_address``)."""
    if fr.fed.runtime == "local" or fr.fed.ray_address:
        yield
        return
    from fedlowrank.federated import handoff
    from fedlowrank.federated.task import data_args, fed_data, forget_data

    dest = Path(fr.out_dir).resolve() / "flwr_runtime" / "data"
    dest.parent.mkdir(parents=True, exist_ok=True)
    handoff.write(fed_data(fr), data_args(fr), dest)
    before = os.environ.get(handoff.ENV)
    os.environ[handoff.ENV] = str(dest)
    forget_data()  # this process too maps the handed-over copy from now on (one copy in memory, not two)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(handoff.ENV, None)
        else:
            os.environ[handoff.ENV] = before


def check_batched(fr: FederatedRun) -> None:
    """``fed.batched_clients`` only where it can run: the local runtime, plain SGD on a classification task."""
    if not fr.fed.batched_clients:
        return
    if fr.fed.runtime != "local":
        raise ConfigError(f"fed.batched_clients=true needs fed.runtime=local, got {fr.fed.runtime}")
    from fedlowrank.federated.batched import unsupported

    why = unsupported(fr)
    if why is not None:
        raise ConfigError(f"fed.batched_clients=true cannot train this run's clients together: {why}")


def check_resume_state(fr: FederatedRun) -> None:
    """With ``fed.resume``, the checkpoint the server will continue from passes every check before any runtime
    starts (a planted or damaged one: CheckpointError, exit 2; ``auto_or_fresh``: set aside here, with a warning)."""
    if fr.fed.resume:
        from fedlowrank.federated.methods import fed_method
        from fedlowrank.federated.resume import resume_point

        resume_point(Path(fr.out_dir), fr, fed_method(fr).initial_state(), check_only=True)


def run_runtime(fr: FederatedRun, cfg: DictConfig) -> dict:
    """The run on its configured runtime, in this process's network."""
    if fr.fed.runtime == "superlink":
        from .superlink import run_on_superlink

        return run_on_superlink(fr, cfg)
    if fr.fed.runtime == "local":
        from .local import run_local

        return run_local(fr)
    return run_in_process(fr)


def use_private_network(fr: FederatedRun) -> bool:
    """Whether the run goes into a private network namespace (``fed.isolation``); ConfigError when ``netns``
    is required and the kernel refuses it."""
    if fr.fed.isolation == "none" or fr.fed.runtime == "local":  # local: no ports to protect
        return False
    if fr.fed.ray_address:  # the cluster's nodes must reach this run's driver, and it them
        log.info("fed.ray_address=%s: the run stays in the host's network (no private namespace)", fr.fed.ray_address)
        return False
    why = private_net.unavailable()
    if why is None:
        return True
    if fr.fed.isolation == "netns":
        raise ConfigError(f"fed.isolation=netns: this kernel refuses a private network namespace ({why}); "
                          "unprivileged user namespaces must be enabled, or choose fed.isolation=none")
    log.warning("no private network namespace here (%s): the run's SuperLink and Ray ports on 127.0.0.1 accept "
                "any local process, which can submit code to them; fed.isolation=none silences this", why)
    return False


def run_isolated(fr: FederatedRun, cfg: DictConfig) -> dict:
    """Run ``cfg`` inside a private network (see :mod:`.private_net`) with :mod:`.isolated`, relaying its log; the
    summary (or the error that stopped it) comes back as JSON in ``<out_dir>/flwr_runtime``."""
    from .logs import relay_stream

    work = Path(fr.out_dir).resolve() / "flwr_runtime"
    work.mkdir(parents=True, exist_ok=True)
    result = work / "isolated_result.json"
    result.unlink(missing_ok=True)
    if fr.fed.runtime == "superlink":  # prepared here: the process inside only launches (no torch there)
        from .superlink import prepare

        job, arg = "superlink", work / "isolated_spec.json"
        arg.write_text(json.dumps(prepare(fr, cfg)))
    else:
        job, arg = "runner", work / "isolated_config.yaml"
        OmegaConf.save(cfg, arg, resolve=True)
    metrics = Path(fr.out_dir).resolve() / "metrics.json"
    complete = written_again(metrics)
    proc = subprocess.Popen(private_net.command([sys.executable, "-m", "fedlowrank.runtime.isolated", job, str(arg),
                                                 str(result)]),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    relay = StreamRelay()
    pump = relay_stream(proc.stdout, relay=relay) if proc.stdout is not None else None
    ended = False
    try:  # the SuperLink job ends its Flower and Ray early itself (superlink.launch); run_simulation's end here
        if job == "runner":
            ended = wait_or_end(proc, relay, complete)
        else:
            proc.wait()
    finally:
        if proc.poll() is None:  # interrupted here: stop the run (its own watchdog stops what it started)
            proc.terminate()
            proc.wait(timeout=60)
        if pump is not None:
            pump.join(timeout=5)
    if ended:
        return json.loads(metrics.read_text())
    out = json.loads(result.read_text()) if result.exists() else {}
    if out.get("kind") == "Stopped":
        raise stop.Stopped(int(out.get("signum", 2)))
    if "error" in out:
        raise _ERRORS.get(out.get("kind"), RuntimeError)(out["error"])
    if proc.returncode != 0 or "results" not in out:
        raise RuntimeError(f"the federated run in its private network exited {proc.returncode} without a result; "
                           f"see the log above and {fr.out_dir}")
    return out["results"]


def wait_or_end(proc: subprocess.Popen, relay: StreamRelay, complete: Callable[[], bool], poll: float = 0.05,
                grace: float = 1.0) -> bool:
    """Wait for ``proc`` (a run's process); once its summary has been relayed (``relay.summary_done``) and
    ``complete()`` holds, end it and everything it started (:func:`.reaper.end_tree`) instead of waiting for
    run_simulation's and Ray's shutdown (~3 s). True if it was ended so, False if it exited by itself."""
    while True:
        try:
            proc.wait(timeout=poll)
            return False
        except subprocess.TimeoutExpired:
            pass
        if relay.summary_done.is_set() and complete():
            reaper.end_tree(proc, grace=grace)
            return True


def run_in_process(fr: FederatedRun) -> dict:
    """The apps on ``flwr.simulation.run_simulation`` (deprecated in flwr 1.41), in this process."""
    import torch
    from flwr.simulation import run_simulation

    from fedlowrank.federated.apps import make_client_app, make_server_app

    cuda = torch.cuda.is_available()
    here = {"num_cpus": os.cpu_count() or 1, "num_gpus": torch.cuda.device_count() if cuda else 0}
    backend = {  # on an existing cluster (fed.ray_address) Ray counts its nodes' resources itself
        "client_resources": {"num_cpus": fr.fed.client_cpus, "num_gpus": fr.fed.client_gpus if cuda else 0.0},
        "init_args": {**({"address": fr.fed.ray_address} if fr.fed.ray_address else here),
                      "include_dashboard": False, "logging_level": logging.WARNING},
    }
    from .logs import quiet_flower

    quiet_flower()  # Flower's strategy tree and raw metric dumps: the project logs each round itself
    warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)
    results: dict = {}
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


def check_partitions(fr: FederatedRun) -> None:
    """Every client gets data under the configured partitioning, checked before Ray starts."""
    try:
        sizes = partition_sizes(fr)
    except (ValueError, RuntimeError, IndexError) as e:  # e.g. more clients than examples
        raise ConfigError(f"cannot partition data={fr.data.name} for fed.num_clients={fr.fed.num_clients} with "
                          f"fed.partition={fr.fed.partition} fed.min_partition_size={fr.fed.min_partition_size}: "
                          f"{e}") from e
    empty = [i for i, n in enumerate(sizes) if n < max(1, fr.fed.min_partition_size)]
    if empty:
        raise ConfigError(f"client(s) {empty[:10]} get fewer than max(1, fed.min_partition_size="
                          f"{fr.fed.min_partition_size}) examples (sizes {sizes[:10]}); lower fed.num_clients or "
                          "fed.min_partition_size")
