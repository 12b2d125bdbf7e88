"""Build (factorized) models from plain config dicts."""
from __future__ import annotations

import typing
from dataclasses import fields
from typing import Any

from torch import nn

from fedlowrank.lowrank import factorize

from .lstm import LSTMLM, LSTMConfig
from .vision import VISION_MODELS, VisionConfig, build_vision_model

_LOWRANK_KEYS = ("family", "name", "skip", "targets")


def vision_config(model: dict[str, Any], data_name: str) -> VisionConfig:
    from fedlowrank.config import IMAGE_SPECS

    if data_name not in IMAGE_SPECS:
        raise ValueError(f"no image spec for dataset {data_name!r}")
    c, s, k = IMAGE_SPECS[data_name]
    kw = {k_: v for k_, v in model.items() if k_ not in _LOWRANK_KEYS}
    valid = {f.name for f in fields(VisionConfig)}
    unknown = sorted(set(kw) - valid)
    if unknown:
        raise ValueError(f"model: unknown key(s) {unknown} for a vision model; valid: {sorted(valid | set(_LOWRANK_KEYS))}")
    kw.update(in_channels=c, image_size=s, num_classes=k)
    from fedlowrank.config import check_type

    hints = typing.get_type_hints(VisionConfig)
    return VisionConfig(**{k_: check_type(v, hints[k_], f"model.{k_}") for k_, v in kw.items()})


def lstm_config(model: dict[str, Any], vocab_size: int) -> LSTMConfig:
    """LSTMConfig from a ``model.family=lstm`` config dict; unknown keys and wrong types are errors."""
    from fedlowrank.config import check_type

    kw = {k_: v for k_, v in model.items() if k_ not in _LOWRANK_KEYS}
    valid = {f.name for f in fields(LSTMConfig)} - {"vocab_size"}
    unknown = sorted(set(kw) - valid)
    if unknown:
        raise ValueError(f"model: unknown key(s) {unknown} for an LSTM model; valid: {sorted(valid | set(_LOWRANK_KEYS))}")
    hints = typing.get_type_hints(LSTMConfig)
    return LSTMConfig(vocab_size=vocab_size, **{k_: check_type(v, hints[k_], f"model.{k_}") for k_, v in kw.items()})


def dense_model(model: dict[str, Any], data_name: str, vocab_size: int | None = None) -> nn.Module:
    """The dense model of a config: an LSTM language model (``family: lstm``, needs ``vocab_size``) or a
    vision model for the image dataset ``data_name``."""
    if model.get("family") == "lstm":
        if vocab_size is None:
            raise ValueError("an LSTM model needs the dataset's vocabulary size")
        return LSTMLM(lstm_config(model, vocab_size))
    return build_vision_model(vision_config(model, data_name))


def validate_vision_model(model: dict[str, Any], data_name: str) -> None:
    if model.get("family", "vision") != "vision":
        raise ValueError(f"federated mode needs a vision model (model.family=vision), got {model.get('family')!r}")
    cfg = vision_config(model, data_name)
    if cfg.arch not in VISION_MODELS:
        raise ValueError(f"unknown vision arch {cfg.arch!r}; choose from {sorted(VISION_MODELS)}")


def build_lowrank_vision(model: dict[str, Any], data_name: str, ratio: float | None = None,
                         rank: int | None = None) -> nn.Module:
    """Dense vision model, then factorized with the budget; ``model['skip']`` layers stay dense."""
    net = build_vision_model(vision_config(model, data_name))
    factorize(net, rank=rank, ratio=ratio, targets=model.get("targets"), skip=model.get("skip"))
    return net
