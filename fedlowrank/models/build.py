"""Build (factorized) models from plain config dicts."""
from __future__ import annotations

import copy
import json
from dataclasses import fields
from functools import lru_cache
from typing import Any

from torch import nn

from fedlowrank.data.vision import IMAGE_SPECS, VECTOR_SPECS
from fedlowrank.lowrank import factorize
from fedlowrank.schema import to_dataclass

from .gpt2 import GPT2, GPT2Config
from .lstm import LSTMLM, LSTMConfig
from .vision import VISION_MODELS, VisionConfig, build_vision_model

_LOWRANK_KEYS = ("family", "name", "skip", "targets")


def vision_config(model: dict[str, Any], data_name: str) -> VisionConfig:
    """VisionConfig from a ``model`` config dict, shaped for the image dataset ``data_name``."""
    specs = {**IMAGE_SPECS, **VECTOR_SPECS}
    if data_name not in specs:
        raise ValueError(f"no image spec for dataset {data_name!r}")
    if data_name in VECTOR_SPECS and model.get("arch") != "mlp":
        raise ValueError(f"data={data_name} holds feature vectors: use model=mlp (model.hidden=[] is softmax "
                         f"regression), not arch {model.get('arch')!r}")
    c, s, k = specs[data_name]
    return _typed_config(VisionConfig, model, {"in_channels": c, "image_size": s, "num_classes": k}, "a vision model")


def _typed_config(cls, model: dict[str, Any], fixed: dict[str, Any], kind: str):
    """``cls(**fixed, **model)`` from a config dict; unknown keys and wrong types are errors. Validated once per
    distinct config (a federated client builds its model every round); each call returns its own copy."""
    kw = {k_: _plain(v) for k_, v in model.items() if k_ not in _LOWRANK_KEYS}
    try:
        key = json.dumps([kw, fixed], sort_keys=True)
    except TypeError:  # not JSON-able: validate without the cache
        return _validate(cls, kw, fixed, kind)
    return copy.deepcopy(_validated(cls, key, kind))


def _plain(v: Any) -> Any:
    """OmegaConf lists/dicts as plain Python ones (for the cache key and the dataclass)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(v) if isinstance(v, (DictConfig, ListConfig)) else v


@lru_cache(maxsize=64)
def _validated(cls, key: str, kind: str):
    kw, fixed = json.loads(key)
    return _validate(cls, kw, fixed, kind)


def _validate(cls, kw: dict[str, Any], fixed: dict[str, Any], kind: str):
    valid = {f.name for f in fields(cls)} - set(fixed)
    unknown = sorted(set(kw) - valid)
    if unknown:
        raise ValueError(f"model: unknown key(s) {unknown} for {kind}; valid: {sorted(valid | set(_LOWRANK_KEYS))}")
    return to_dataclass(cls, kw, "model", fixed=fixed)


def lstm_config(model: dict[str, Any], vocab_size: int) -> LSTMConfig:
    """LSTMConfig from a ``model.family=lstm`` config dict."""
    return _typed_config(LSTMConfig, model, {"vocab_size": vocab_size}, "an LSTM model")


def transformer_config(model: dict[str, Any], vocab_size: int) -> GPT2Config:
    """A small GPT-2 (``model.family=transformer``: n_layer, n_head, n_embd, block_size, dropout, bias)."""
    return _typed_config(GPT2Config, model, {"vocab_size": vocab_size}, "a transformer model")


TEXT_FAMILIES = ("lstm", "transformer")


def dense_model(model: dict[str, Any], data_name: str, vocab_size: int | None = None) -> nn.Module:
    """The dense model of a config: a character language model (``family: lstm | transformer``, needs
    ``vocab_size``) or a vision model for the image dataset ``data_name``."""
    family = model.get("family")
    if family in TEXT_FAMILIES:
        if vocab_size is None:
            raise ValueError(f"a {family} model needs the dataset's vocabulary size")
        if family == "lstm":
            return LSTMLM(lstm_config(model, vocab_size))
        return GPT2(transformer_config(model, vocab_size))
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
