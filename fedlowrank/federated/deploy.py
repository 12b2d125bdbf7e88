"""Config for apps started by ``flwr run`` (no Hydra CLI there): compose ``conf/`` with
overrides given in the Flower run config, e.g. ``--run-config 'overrides="strategy=product fed.rounds=5"'``."""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from fedlowrank.config import FederatedRun, federated_run_from_cfg

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def compose_cfg(overrides: list[str] | None = None):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides or []))


def run_from_run_config(run_config: dict[str, Any]) -> FederatedRun:
    overrides = shlex.split(str(run_config.get("overrides", "")))
    cfg = compose_cfg(["mode=federated", *overrides])
    if cfg.get("out_dir") is None:
        cfg.out_dir = str(run_config.get("out-dir", "outputs/flwr"))
    return federated_run_from_cfg(cfg)
