"""Config for apps started by ``flwr run`` (no Hydra CLI there): compose ``conf/`` with
overrides given in the Flower run config, e.g. ``--run-config 'overrides="strategy=product fed.rounds=5"'``."""
from __future__ import annotations

import functools
import os
import re
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
PATH_KEYS = ("out_dir", "data.root", "data.cache_dir", "data.path", "data.train_path", "data.eval_path", "data.dir",
             "model.pretrained", "method.from_ckpt", "method.stage1_ckpt", "trainer.resume", "hydra")
# names of path-valued keys at any depth of a composed config: compared against the project's own defaults
PATH_NAMES = frozenset(k.rsplit(".", 1)[-1] for k in PATH_KEYS) | {"ckpt", "config-file", "file"}
GROUP_OPTION = re.compile(r"^[A-Za-z0-9_]+$")


def group_options() -> dict[str, set[str]]:
    """Each config group's options: the YAML files under ``conf/<group>/`` and the dataclass nodes registered
    with Hydra (``method=relora`` etc.)."""
    from fedlowrank.config.store import schema_defaults

    opts = {d.name: {f.stem for f in d.glob("*.yaml")} for d in CONF_DIR.iterdir() if d.is_dir()}
    for key in schema_defaults():
        group, name = key.split("/")
        opts.setdefault(group, set()).add(name)
    return opts


def check_remote_overrides(overrides: list[str]) -> None:
    """Reject overrides that would make a node read or write paths chosen by whoever submitted the run, read its
    environment (``${...}`` interpolations), or load a group option from outside ``conf/``."""
    groups = group_options()
    for i, o in enumerate(overrides):
        key, _, value = o.lstrip("+~").partition("=")
        key = key.strip()
        if "${" in o:  # never resolved here, so never echoed back: name the key only
            raise ConfigError(f"run config override #{i + 1} ({key}) uses an interpolation (${{...}}); remote "
                              "values must be literals")
        if key.split("@")[0].split("/")[0] in ("schema", "hydra"):
            raise ConfigError(f"run config override {o!r}: the {key.split('@')[0]} nodes are internal")
        if any(key == k or key.startswith(k + ".") or key.startswith(k + "/") for k in PATH_KEYS):
            raise ConfigError(f"run config override {o!r} sets a file path ({key}); paths are local to each "
                              "machine and cannot come from a remote run config")
        if key in groups and value != "null" and not (GROUP_OPTION.match(value) and value in groups[key]):
            raise ConfigError(f"run config override {o!r}: {key} must name one of its options "
                              f"({', '.join(sorted(groups[key]))})")


def _path_values(node: Any, prefix: str = "") -> dict[str, Any]:
    """Every path-valued key (by name, at any depth) of a config container, and every string holding ``${``."""
    out: dict[str, Any] = {}
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, (dict, list)):
            out.update(_path_values(v, key + "."))
        elif str(k) in PATH_NAMES or (isinstance(v, str) and "${" in v):
            out[key] = v
    return out


@functools.lru_cache(maxsize=16)
def _defaults_for(groups: tuple[str, ...]) -> dict[str, Any]:
    """Path values of the project's own config for these group selections (composed here, never cached on disk)."""
    from omegaconf import OmegaConf

    return _path_values(OmegaConf.to_container(compose_cfg(["mode=federated", *groups]), resolve=False))


def check_composed(cfg: Any, overrides: list[str]) -> None:
    """The composed remote config may differ from the project's defaults for the same group options in no
    path-valued key and no interpolation, whatever produced it (override syntax, a node's config cache)."""
    from omegaconf import OmegaConf

    groups = tuple(o for o in overrides if "." not in o.split("=", 1)[0] and not o.startswith(("~", "++")))
    base = _defaults_for(groups)
    got = _path_values(OmegaConf.to_container(cfg, resolve=False))
    changed = sorted(k for k in set(base) | set(got) if base.get(k) != got.get(k))
    if changed:
        raise ConfigError(f"the remote run config changes path-valued or interpolated key(s) {changed} from the "
                          "project's defaults; paths are local to each machine")


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
    try:
        cfg = compose(["mode=federated", *overrides])
    except Exception as e:  # Hydra's grammar and composition errors: the submitter's own text, no resolution
        raise ConfigError(f"run config overrides do not compose: {str(e).splitlines()[0] if str(e) else e!r}") from e
    check_composed(cfg, overrides)
    cfg.out_dir = local_out_dir(str(run_config.get("out-dir", "outputs/flwr")))
    return federated_run_from_cfg(cfg)
