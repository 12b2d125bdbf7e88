"""Typed config of the model zoo in central mode: image classifiers (MLP, CNN, VGG, ResNet, ViT) on image data and
character models (LSTM, small Transformer) on text, trained from scratch dense or low rank (:class:`ZooModelConfig`,
:class:`ImageDataConfig`), and the low-rank switches every central model shares (:func:`check_lowrank`)."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from fedlowrank.schema import ConfigError, to_dataclass

IMAGE_DATA = ("digits", "cifar10", "cifar100")
ZOO_FAMILIES = ("vision", "lstm", "transformer")
LOWRANK_INITS = ("spectral", "random")


def check_lowrank(m: Any, modes: tuple[str, ...] = ("none", "fixed")) -> None:
    """``model.lowrank`` / ``rank`` / ``ratio`` / ``init`` / ``dense_first`` of any central model config."""
    if m.lowrank not in modes:
        raise ConfigError(f"model.lowrank must be {'|'.join(modes)}, got {m.lowrank!r}")
    if m.lowrank == "fixed":
        if (m.rank is None) == (m.ratio is None):
            raise ConfigError("model.lowrank=fixed needs exactly one of model.rank / model.ratio")
        if m.rank is not None and m.rank <= 0:
            raise ConfigError(f"model.rank must be > 0, got {m.rank}")
        if m.ratio is not None and not 0 < m.ratio <= 1:
            raise ConfigError(f"model.ratio must be in (0, 1], got {m.ratio}")
    if m.init not in LOWRANK_INITS:
        raise ConfigError(f"model.init must be {'|'.join(LOWRANK_INITS)}, got {m.init!r}")
    if m.dense_first < 0:
        raise ConfigError(f"model.dense_first must be >= 0, got {m.dense_first}")


@dataclass
class LowRankSwitches:
    """The low-rank switches of every central model (``conf/mode/central.yaml`` adds them to any ``model``)."""

    lowrank: str = "none"  # none (dense) | fixed (every targeted layer at model.rank or model.ratio) | inrank (LMs)
    rank: int | None = None
    ratio: float | None = None
    init: str = "spectral"  # spectral (SVD of the dense init, Khodak et al. 2021) | random (independent factors)
    dense_first: int = 0  # hybrid as in Pufferfish: the first k factorizable layers stay dense


@dataclass
class ZooModelConfig(LowRankSwitches):
    """A zoo model: ``family`` and the architecture's own keys (``arch_kw``: those of VisionConfig, LSTMConfig or
    the small GPT-2's config, checked when the run is validated), plus the low-rank switches."""

    family: str = "vision"
    targets: list[str] | None = None  # regexes of layers to factorize (default: every Linear/Conv2d)
    skip: list[str] = field(default_factory=list)  # regexes of layers kept dense (hybrid)
    arch_kw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_node(cls, node: dict[str, Any]) -> "ZooModelConfig":
        own = {f.name for f in fields(cls)} - {"arch_kw"}
        typed = to_dataclass(cls, {k: v for k, v in node.items() if k in own}, "model")
        typed.arch_kw = {k: v for k, v in node.items() if k not in own}
        return typed

    @property
    def arch(self) -> str:
        return str(self.arch_kw.get("arch", self.family))

    @property
    def size(self) -> str:
        return "zoo"

    pretrained = None  # zoo models train from scratch

    def model_dict(self) -> dict[str, Any]:
        """The plain dict :func:`fedlowrank.models.build.dense_model` takes."""
        return {"family": self.family, **self.arch_kw}

    def validate(self, data_name: str, block_size: int) -> None:
        if self.family not in ZOO_FAMILIES:
            raise ConfigError(f"model.family must be lm or one of {ZOO_FAMILIES}, got {self.family!r}")
        check_lowrank(self)
        image = data_name in IMAGE_DATA
        if (self.family == "vision") != image:
            raise ConfigError(f"model.family={self.family} does not train on data={data_name}: vision models take "
                              f"image data {IMAGE_DATA}, lstm/transformer models a text corpus")
        from fedlowrank.models import build

        try:
            if self.family == "vision":
                build.validate_vision_model(self.model_dict(), data_name)
            elif self.family == "lstm":
                build.lstm_config(self.model_dict(), 256)
            else:
                tc = build.transformer_config(self.model_dict(), 256)
                if tc.block_size < block_size:
                    raise ConfigError(f"model.block_size={tc.block_size} is shorter than trainer.block_size="
                                      f"{block_size}")
        except ValueError as e:
            raise ConfigError(str(e)) from e
        if self.family == "vision":
            self._check_shapes(data_name)

    def _check_shapes(self, data_name: str) -> None:
        """One forward on the meta device (no memory, no compute): an architecture too deep for the image size
        is an error now, not after the data are loaded."""
        import torch

        from fedlowrank.data.vision import IMAGE_SPECS
        from fedlowrank.models.build import dense_model

        c, s, _ = IMAGE_SPECS[data_name]
        try:
            with torch.device("meta"):
                dense_model(self.model_dict(), data_name)(torch.empty(2, c, s, s))
        except (RuntimeError, ValueError) as e:
            raise ConfigError(f"model.arch={self.arch} does not fit data={data_name} ({c}x{s}x{s} images): "
                              f"{str(e).splitlines()[0]}") from e


@dataclass
class ImageDataConfig:
    name: str = "digits"
    root: str = "data"
    download: bool = True  # cifar: fetch through torchvision when it is not under root (needs the internet once)
    seed: int = 0
    source: str = "local"
    test_fraction: float = 0.2  # digits: the held-out share (CIFAR has its own test set)
    augment: bool | None = None  # padded random crop + horizontal flip; default: on for CIFAR, off for digits

    def validate(self) -> None:
        if self.name not in IMAGE_DATA:
            raise ConfigError(f"data.name must be one of {IMAGE_DATA} for an image classifier, got {self.name!r}")
        if self.source != "local":
            raise ConfigError("data.source=hub is for federated mode; central mode reads local (or torchvision) data")
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"data.test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.augment and self.name == "digits":
            raise ConfigError("data.augment is CIFAR's crop-and-flip; it does not suit 8x8 digits")

    @property
    def augmented(self) -> bool:
        return self.name != "digits" if self.augment is None else bool(self.augment)
