"""``python main.py mode=federated``: Flower simulation (Ray) of heterogeneous-rank clients."""
from __future__ import annotations

import logging
import os

from omegaconf import DictConfig

from fedlowrank.config import federated_run_from_cfg

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    """Validate ``cfg`` (errors before any training), run the simulation, return the summary."""
    import torch
    from flwr.simulation import run_simulation

    from clients.client_app import make_client_app
    from server.server_app import make_server_app

    fr = federated_run_from_cfg(cfg)
    os.makedirs(fr.out_dir, exist_ok=True)
    cuda = torch.cuda.is_available()
    backend = {
        "client_resources": {"num_cpus": fr.fed.client_cpus, "num_gpus": fr.fed.client_gpus if cuda else 0.0},
        "init_args": {"num_cpus": os.cpu_count() or 1, "num_gpus": torch.cuda.device_count() if cuda else 0,
                      "include_dashboard": False, "logging_level": logging.WARNING},
    }
    results: dict = {}
    log.info("federated run: strategy=%s clients=%d rounds=%d budgets=%s out=%s", fr.strategy, fr.fed.num_clients,
             fr.fed.rounds, fr.fed.ranks or fr.fed.rank_ratios, fr.out_dir)
    run_simulation(server_app=make_server_app(fr, results), client_app=make_client_app(fr),
                   num_supernodes=fr.fed.num_clients, backend_config=backend)
    if not results:
        raise RuntimeError(f"federated simulation produced no result; see the log above and {fr.out_dir}")
    return results
