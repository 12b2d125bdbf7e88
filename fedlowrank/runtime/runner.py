"""``python main.py mode=federated``: heterogeneous-rank clients on Flower's simulation runtime (a private
SuperLink in simulation mode, clients on Ray), or with ``fed.runtime=simulation`` on the deprecated in-process
``run_simulation``. Validates first (errors before any training), then hands over to the runtime."""
from __future__ import annotations

import logging
import os
import time
import warnings

from omegaconf import DictConfig

from fedlowrank.config import ConfigError, FederatedRun, federated_run_from_cfg
from fedlowrank.federated.report import keep_matplotlib_in
from fedlowrank.federated.server import partition_sizes

from . import reaper

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    """Validate ``cfg``, run the federated simulation on the configured runtime, log and return the summary."""
    keep_matplotlib_in(str(cfg.get("out_dir") or "."))
    fr = federated_run_from_cfg(cfg)
    if fr.fed.runtime == "superlink":
        from .superlink import check_superlink_runtime

        check_superlink_runtime()
    check_partitions(fr)
    os.makedirs(fr.out_dir, exist_ok=True)
    log.info("federated run: strategy=%s clients=%d rounds=%d budgets=%s runtime=%s; output in %s", fr.strategy,
             fr.fed.num_clients, fr.fed.rounds, fr.fed.ranks or fr.fed.rank_ratios, fr.fed.runtime,
             os.path.abspath(fr.out_dir))
    t0 = time.time()
    if fr.fed.runtime == "superlink":
        from .superlink import run_on_superlink

        results = run_on_superlink(fr, cfg)
    else:
        results = run_in_process(fr)
    log.info("%.1f s wall in all (start-up included); summary: %s", time.time() - t0,
             os.path.join(os.path.abspath(fr.out_dir), "metrics.json"))
    return results


def run_in_process(fr: FederatedRun) -> dict:
    """The apps on ``flwr.simulation.run_simulation`` (deprecated in flwr 1.41), in this process."""
    import torch
    from flwr.simulation import run_simulation

    from fedlowrank.federated.apps import make_client_app, make_server_app

    cuda = torch.cuda.is_available()
    backend = {
        "client_resources": {"num_cpus": fr.fed.client_cpus, "num_gpus": fr.fed.client_gpus if cuda else 0.0},
        "init_args": {"num_cpus": os.cpu_count() or 1, "num_gpus": torch.cuda.device_count() if cuda else 0,
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
