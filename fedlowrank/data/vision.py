"""Image datasets: sklearn digits (embedded, offline default) and CIFAR-10/100 (torchvision), and the
standard CIFAR augmentation (padded random crop, horizontal flip) on batch tensors."""
from __future__ import annotations

import gzip
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

# channels, image size, classes of each image dataset the project knows
IMAGE_SPECS = {"digits": (1, 8, 10), "cifar10": (3, 32, 10), "cifar100": (3, 32, 100), "femnist": (1, 28, 62)}
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


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 8×8 handwritten digits: images (1797, 8, 8) float64 in 0..16 and labels (1797,) int, read from the
    CSV scikit-learn ships (what ``sklearn.datasets.load_digits`` reads) without importing scikit-learn (1.2 s)."""
    spec = importlib.util.find_spec("sklearn")
    where = spec.submodule_search_locations if spec else None
    path = Path(where[0]) / "datasets" / "data" / "digits.csv.gz" if where else None
    if path is None or not path.is_file():  # another layout: scikit-learn's own loader
        from sklearn.datasets import load_digits

        d = load_digits()
        return d.images, d.target
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",")  # (N, 65): 64 pixels, then the label
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def load_digits_data(test_fraction: float = 0.2, seed: int = 0) -> ImageData:
    """sklearn's 8×8 handwritten digits (1,797 images, ships with scikit-learn)."""
    images, target = digits_arrays()
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    x = (x - 0.3) / 0.4
    y = torch.tensor(target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(y)))
    te, tr = perm[:n_test], perm[n_test:]
    return ImageData(x[tr], y[tr], x[te], y[te], 10)


CIFAR_MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
CIFAR_STD = {"cifar10": (0.2470, 0.2435, 0.2616), "cifar100": (0.2673, 0.2564, 0.2762)}


def cifar_arrays(name: str, root: str | Path, download: bool) -> tuple[np.ndarray, list[int], np.ndarray, list[int]]:
    """CIFAR-10/100 through torchvision: uint8 images (N, 32, 32, 3) and labels, train then test. torchvision
    checks the archive's MD5 before it reads the (pickled) batches, so only the official files are read."""
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if name == "cifar10" else CIFAR100
    try:
        tr = cls(str(root), train=True, download=download)
        te = cls(str(root), train=False, download=download)
    except Exception as e:  # network failure or missing files
        raise RuntimeError(
            f"{name.replace('cifar', 'CIFAR-')} is not available under {str(root)!r} and could not be downloaded "
            f"({e}). "
            "Download it with internet access (data.download=true) or use data=digits."
        ) from e
    return tr.data, tr.targets, te.data, te.targets


def load_cifar_data(name: str = "cifar10", root: str | Path = "data/cifar10", download: bool = True) -> ImageData:
    """CIFAR-10 or CIFAR-100, normalised per channel with the dataset's mean and std: x (N, 3, 32, 32)."""
    xtr, ytr, xte, yte = cifar_arrays(name, root, download)
    mean, std = np.array(CIFAR_MEAN[name], np.float32), np.array(CIFAR_STD[name], np.float32)

    def conv(x: np.ndarray, y: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        x = (x.astype(np.float32) / 255.0 - mean) / std  # (N, 32, 32, 3)
        return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.tensor(y, dtype=torch.long)

    return ImageData(*conv(xtr, ytr), *conv(xte, yte), 100 if name == "cifar100" else 10)


def load_cifar10_data(root: str | Path = "data/cifar10", download: bool = True) -> ImageData:
    return load_cifar_data("cifar10", root, download)


def augment_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4,
                      fill: tuple[float, ...] | None = None) -> torch.Tensor:
    """The standard CIFAR augmentation on a batch: a random ``H×W`` crop of the image padded by ``pad`` on
    every side (padding = ``fill`` per channel, e.g. black after normalisation; 0 by default), then a
    horizontal flip with probability 1/2. x: (B, C, H, W); draws come from ``generator`` (exact resume)."""
    b, c, h, w = x.shape
    xp = x.new_zeros(b, c, h + 2 * pad, w + 2 * pad)
    if fill is not None:
        xp += torch.tensor(fill, dtype=x.dtype, device=x.device).view(1, c, 1, 1)
    xp[:, :, pad:pad + h, pad:pad + w] = x
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    rows = (oy[:, None] + torch.arange(h)).to(x.device)  # (B, H)
    cols = ox[:, None] + torch.arange(w)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols).to(x.device)
    bi = torch.arange(b, device=x.device)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def black_fill(name: str) -> tuple[float, ...]:
    """The normalised value of a black pixel per channel (what torchvision's padded crop shows)."""
    return tuple(-m / s for m, s in zip(CIFAR_MEAN[name], CIFAR_STD[name]))


def load_image_data(name: str, root: str = "data", download: bool = True, seed: int = 0) -> ImageData:
    if name == "digits":
        return load_digits_data(seed=seed)
    if name in ("cifar10", "cifar100"):
        return load_cifar_data(name, Path(root) / name, download=download)
    raise ValueError(f"unknown image dataset {name!r} (digits|cifar10|cifar100)")
