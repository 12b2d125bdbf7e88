"""Typed config sections from plain nodes, on OmegaConf's structured configs: unknown keys and values of the
wrong type are refused with the key's full name. The ground floor of the config layer: it imports nothing
from fedlowrank, so models, methods and data may use it too."""
from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """Invalid configuration, raised before any training starts."""


def to_dataclass(cls: type, node: Any, where: str, fixed: dict[str, Any] | None = None) -> Any:
    """``cls(**fixed, **node)`` with the node typed against ``cls``'s annotations by OmegaConf (ints are
    accepted for floats, strings that spell a number for numbers); an unknown key or an ill-typed value is a
    :class:`ConfigError` naming ``where.<key>`` and, for unknown keys, the valid ones."""
    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
    names = {f.name for f in dataclasses.fields(cls)} - set(fixed or {})
    unknown = sorted(set(data) - names)
    if unknown:
        hints = {k: difflib.get_close_matches(k, sorted(names), n=1, cutoff=0.6) for k in unknown}
        said = "; ".join(f"{where}.{k}: did you mean {where}.{h[0]}?" for k, h in hints.items() if h)
        raise ConfigError(f"{where}: unknown key(s) {unknown}{'; ' + said if said else ''}; valid keys: {sorted(names)}")
    missing = sorted(k for k, v in data.items() if v == "???")  # OmegaConf's mandatory marker
    if missing:
        raise ConfigError(f"{where}: {', '.join(f'{where}.{k}' for k in missing)} must be set (this config "
                          "has no default for it), e.g. on the command line")
    hints = typing.get_type_hints(cls)
    for k, v in data.items():  # a scalar where a list is expected: OmegaConf would say "AnyNode is not a ListConfig"
        if list in (typing.get_origin(hints[k]), *map(typing.get_origin, typing.get_args(hints[k]))) and \
                v is not None and not isinstance(v, (list, tuple)):
            raise ConfigError(f"{where}.{k} takes a list, e.g. {where}.{k}=[{v}], got {v!r}")
    for k, v in data.items():  # OmegaConf turns any int (3) or "yes" into a bool: a switch takes true/false only
        if hints[k] in (bool, bool | None) and not (isinstance(v, bool) or (v is None and hints[k] != bool)):
            raise ConfigError(f"{where}.{k}: expected true/false, got {v!r}")
    try:
        typed = OmegaConf.merge(OmegaConf.structured(cls(**(fixed or {})) if fixed else cls), data)
        return OmegaConf.to_object(typed)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{where}.{key}: {reason}") from None


def defaults(cls: type) -> dict[str, Any]:
    """The defaults of dataclass ``cls`` as a plain (untyped) dict: what Hydra composes for a section whose
    schema is ``cls`` (the values live once, in the dataclass; typing happens in :func:`to_dataclass`)."""
    return OmegaConf.to_container(OmegaConf.structured(cls))  # type: ignore[return-value]


def check_top_level(cfg: Any, allowed: set[str], mode: str) -> None:
    """Refuse top-level keys this mode does not read (e.g. ``+bogus_key=1``, or ``fed.*`` in central mode), so a
    typo never passes silently."""
    unknown = sorted(set(cfg.keys()) - allowed - {"hydra"})
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {unknown} in {mode} mode; valid: {sorted(allowed)}")
