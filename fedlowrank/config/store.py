"""The sections' defaults, registered once in Hydra's ConfigStore from the dataclasses, so a default is written
in one place only, the dataclass: ``schema/fed``, ``schema/trainer`` and ``schema/lowrank`` (the central model's
low-rank switches), which ``conf/mode/*.yaml`` pull in (``- /schema@fed: fed``), and the ``method`` group's options
``inrank``, ``relora``, ``welore`` and ``lora`` (federated) (``none`` is ``conf/method/none.yaml``). The nodes are untyped;
:func:`fedlowrank.schema.to_dataclass` types and checks them when a run is built, so every config error keeps the
project's message and exit code 2."""
from __future__ import annotations

from hydra.core.config_store import ConfigStore

from fedlowrank.methods.inrank import InRankConfig
from fedlowrank.methods.relora import ReLoRAConfig
from fedlowrank.methods.welore import WeLoreConfig
from fedlowrank.schema import defaults

from .central import TrainerConfig
from .fed_lora import FedLoRAConfig
from .federated import FedConfig
from .sample import SampleConfig
from .zoo import LowRankSwitches

SECTIONS = {"fed": FedConfig, "trainer": TrainerConfig, "sample": SampleConfig, "lowrank": LowRankSwitches}
METHODS = {"inrank": InRankConfig, "relora": ReLoRAConfig, "welore": WeLoreConfig, "lora": FedLoRAConfig}


def schema_defaults() -> dict[str, dict]:
    """Every registered node (what :func:`register` stores), by ``group/name``."""
    return {**{f"schema/{n}": defaults(c) for n, c in SECTIONS.items()},
            **{f"method/{n}": defaults(c) for n, c in METHODS.items()}}


def register() -> None:
    """Store every node of :func:`schema_defaults` (idempotent: ConfigStore replaces by name)."""
    cs = ConfigStore.instance()
    for key, node in schema_defaults().items():
        group, name = key.split("/")
        cs.store(group=group, name=name, node=node)
