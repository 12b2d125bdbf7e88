"""Config for apps started by ``flwr run`` (no Hydra CLI there): compose ``conf/`` with
overrides given in the Flower run config, e.g. ``--run-config 'overrides="strategy=product fed.rounds=5"'``."""
from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedlowrank.config import ConfigError, FederatedRun, federated_run_from_cfg

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def compose_cfg(overrides: list[str] | None = None):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides or []))


# keys that name files on the machine that runs the app: never taken from a remote run config
PATH_KEYS = ("out_dir", "data.root", "data.cache_dir", "data.path", "data.train_path", "data.eval_path",
             "method.from_ckpt", "method.stage1_ckpt", "trainer.resume", "hydra")


def check_remote_overrides(overrides: list[str]) -> None:
    """Reject overrides that would make a node read or write paths chosen by whoever submitted the run."""
    for o in overrides:
        key = o.lstrip("+~").split("=", 1)[0].strip()
        if any(key == k or key.startswith(k + ".") or key.startswith(k + "/") for k in PATH_KEYS):
            raise ConfigError(f"run config override {o!r} sets a file path ({key}); paths are local to each "
                              "machine and cannot come from a remote run config")


def local_out_dir(value: str) -> str:
    """``out-dir`` of the run config: a relative path below the app's working directory."""
    p = Path(value)
    if p.is_absolute() or ".." in p.parts:
        raise ConfigError(f"run config out-dir {value!r} must be a relative path without '..' (it is resolved in "
                          "the ServerApp's working directory)")
    return str(p)


CACHE_ENV = "FEDLOWRANK_CACHE_DIR"  # a deployed node's disk cache (fedlowrank.deploy.cache); unset: none


def node_cache_dir() -> Path | None:
    """The deployed node's cache directory from ``FEDLOWRANK_CACHE_DIR``; None when unset, empty or ``off``."""
    value = os.environ.get(CACHE_ENV, "")
    return None if value.lower() in ("", "0", "off", "none") else Path(value)


TRUST_ENV = "FEDLOWRANK_TRUSTED_RUN_CONFIG"  # set only by main.py on the runtime it starts for itself


def run_from_run_config(run_config: dict[str, Any], compose: Callable[[list[str]], Any] = compose_cfg,
                        ) -> FederatedRun:
    """The FederatedRun of a ``flwr run``: Hydra ``overrides`` (no file paths) and a relative ``out-dir``;
    or, on a runtime that ``python main.py mode=federated fed.runtime=superlink`` started on this machine
    (``FEDLOWRANK_TRUSTED_RUN_CONFIG=1`` in its environment), the resolved config file it wrote. ``compose``
    turns overrides into a config (a deployed node's cache passes its own)."""
    if run_config.get("config-file"):
        if os.environ.get(TRUST_ENV) != "1":
            raise ConfigError("run config key config-file is only accepted on a runtime started by main.py "
                              f"({TRUST_ENV}=1 on this machine); use overrides and out-dir")
        from omegaconf import OmegaConf

        return federated_run_from_cfg(OmegaConf.load(str(run_config["config-file"])))
    overrides = shlex.split(str(run_config.get("overrides", "")))
    check_remote_overrides(overrides)
    cfg = compose(["mode=federated", *overrides])
    cfg.out_dir = local_out_dir(str(run_config.get("out-dir", "outputs/flwr")))
    return federated_run_from_cfg(cfg)
