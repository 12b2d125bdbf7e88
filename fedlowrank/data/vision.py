"""Image datasets: sklearn digits (embedded, offline default) and CIFAR-10 (torchvision)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

# channels, image size, classes of each image dataset the project knows
IMAGE_SPECS = {"digits": (1, 8, 10), "cifar10": (3, 32, 10), "femnist": (1, 28, 62)}
# (features, 1, classes): vector data for the MLP (softmax regression with model.hidden=[]); not images
VECTOR_SPECS = {"synthetic": (60, 1, 10)}

log = logging.getLogger(__name__)


@dataclass
class ImageData:
    """Train/test tensors. x: (N, C, H, W) float32, y: (N,) int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    def test_set(self) -> TensorDataset:
        return TensorDataset(self.x_test, self.y_test)


def load_digits_data(test_fraction: float = 0.2, seed: int = 0) -> ImageData:
    """sklearn's 8×8 handwritten digits (1,797 images, ships with scikit-learn)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    x = (x - 0.3) / 0.4
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(y)))
    te, tr = perm[:n_test], perm[n_test:]
    return ImageData(x[tr], y[tr], x[te], y[te], 10)


def load_cifar10_data(root: str | Path = "data/cifar10", download: bool = True) -> ImageData:
    """CIFAR-10 via torchvision; raises a clear error when it is neither on disk nor downloadable."""
    from torchvision.datasets import CIFAR10

    try:
        tr = CIFAR10(str(root), train=True, download=download)
        te = CIFAR10(str(root), train=False, download=download)
    except Exception as e:  # network failure or missing files
        raise RuntimeError(
            f"CIFAR-10 is not available under {root!r} and could not be downloaded ({e}). "
            "Download it with internet access (data.download=true) or use data=digits."
        ) from e
    mean = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32)
    std = np.array([0.2470, 0.2435, 0.2616], dtype=np.float32)

    def conv(ds) -> tuple[torch.Tensor, torch.Tensor]:
        x = (ds.data.astype(np.float32) / 255.0 - mean) / std  # (N, 32, 32, 3)
        return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets, dtype=torch.long)

    xtr, ytr = conv(tr)
    xte, yte = conv(te)
    return ImageData(xtr, ytr, xte, yte, 10)


def load_image_data(name: str, root: str = "data", download: bool = True, seed: int = 0) -> ImageData:
    if name == "digits":
        return load_digits_data(seed=seed)
    if name == "cifar10":
        return load_cifar10_data(Path(root) / "cifar10", download=download)
    raise ValueError(f"unknown image dataset {name!r} (digits|cifar10)")
