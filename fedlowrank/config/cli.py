"""Command-line mistakes caught before Hydra reports them its own way: an override of a key that does not exist
(``fed.round=5``) is named with the closest valid key ("did you mean fed.rounds?"), exit 2, instead of Hydra's
"not in struct" and its hint to add ``+`` (which only moves the error)."""
from __future__ import annotations

import difflib
import re
from typing import Any

from omegaconf import DictConfig


def dotted_keys(node: Any, prefix: str = "") -> list[str]:
    """Every key of a composed config as a dotted path (sections and leaves)."""
    out: list[str] = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            path = f"{prefix}{k}"
            out.append(path)
            out += dotted_keys(node._get_node(k), f"{path}.")  # the node itself: no interpolation is resolved
    return out


def closest(key: str, valid: list[str]) -> str | None:
    """The valid key nearest to ``key`` (same section first), or None when nothing is close."""
    section = key.rsplit(".", 1)[0] + "." if "." in key else ""
    same = [k for k in valid if k.startswith(section) and k.count(".") == key.count(".")]
    hit = difflib.get_close_matches(key, same or valid, n=1, cutoff=0.6)
    return hit[0] if hit else None


def unknown_override(argv: list[str], conf_dir: str) -> str | None:
    """One line naming an override whose key the composed config does not have, with the closest valid key; None
    when Hydra composes the command line (or fails for another reason, which Hydra reports)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    if any(a.split("=", 1)[0] in ("--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd") for a in argv):
        return None  # another primary config: Hydra checks it
    overrides = [a for a in argv if "=" in a and not a.startswith("-") and not a.lstrip("+~").startswith("hydra.")]
    try:
        with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
            compose("config", overrides=overrides)
        return None
    except ConfigCompositionException as e:
        text = f"{e} {e.__cause__}"
        m = re.search(r"Could not override '([^']+)'", text)
        if m is None or "not in struct" not in text:
            return None
        key = m.group(1)
    rest = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != key]
    try:
        with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
            valid = dotted_keys(compose("config", overrides=rest))
    except ConfigCompositionException:
        return f"unknown key {key!r}"
    hint = closest(key, valid)
    section = key.rsplit(".", 1)[0]
    siblings = sorted(k.rsplit(".", 1)[-1] for k in valid if k.startswith(section + ".") and k.count(".") == key.count("."))
    return (f"unknown key {key!r}" + (f": did you mean {hint!r}?" if hint else "")
            + (f" (keys of {section}: {', '.join(siblings)})" if siblings and not hint else ""))


__all__ = ["closest", "dotted_keys", "unknown_override"]
