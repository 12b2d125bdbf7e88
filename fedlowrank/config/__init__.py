"""Typed, validated configs built from the Hydra tree, one dataclass per section: ``fed``/``data`` and the
federated run (:mod:`.federated`), the device population (:mod:`.devices`), ``model``/``data``/``trainer`` and
the central run (:mod:`.central`). Each section validates itself; errors surface before any training.
Importing this package registers the sections' defaults with Hydra (:mod:`.store`)."""
from fedlowrank.schema import ConfigError, to_dataclass

from .federated import (FAULTS, HUB_DATASETS, PARTITIONS, ROBUST, STRATEGIES, TEXT_SPECS, DataConfig, FedConfig,
                        FederatedRun, federated_run_from_cfg)
from .store import register

register()

__all__ = ["FAULTS", "HUB_DATASETS", "PARTITIONS", "ROBUST", "STRATEGIES", "TEXT_SPECS", "ConfigError",
           "DataConfig", "FedConfig", "FederatedRun", "federated_run_from_cfg", "register", "to_dataclass"]
