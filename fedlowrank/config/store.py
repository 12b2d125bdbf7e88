"""The sections' defaults, registered once in Hydra's ConfigStore (group ``schema``) from the dataclasses:
``conf/mode/*.yaml`` pull them in (``- /schema@fed: fed``), so a default is written in one place only, the
dataclass. The nodes are untyped; :func:`fedlowrank.schema.to_dataclass` types and checks them when a run is
built, so every config error keeps the project's message and exit code 2."""
from __future__ import annotations

from hydra.core.config_store import ConfigStore

from fedlowrank.schema import defaults

from .central import TrainerConfig
from .federated import FedConfig

SECTIONS = {"fed": FedConfig, "trainer": TrainerConfig}


def schema_defaults() -> dict[str, dict]:
    """Every registered section's defaults (what :func:`register` stores)."""
    return {name: defaults(cls) for name, cls in SECTIONS.items()}


def register() -> None:
    """Store every section's defaults as ``schema/<name>`` (idempotent: ConfigStore replaces by name)."""
    cs = ConfigStore.instance()
    for name, node in schema_defaults().items():
        cs.store(group="schema", name=name, node=node)
