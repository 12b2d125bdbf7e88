"""Flower users' Hub datasets through flwr-datasets' ``FederatedDataset`` (``data.source=hub``):
``flwrlabs/shakespeare`` (one client per character, LEAF), ``flwrlabs/femnist`` (one client per
writer) and CIFAR-10 (``uoft-cs/cifar10``, iid or Dirichlet). They need the internet once (Hugging
Face caches them); offline, loading stops with an error that says so, before any training.
Each client keeps a seeded ``test_fraction`` of its examples as its own held-out split; the global
test set is the dataset's test split where it has one, else the union of the clients' held-out parts.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

HUB_IDS = {"shakespeare": "flwrlabs/shakespeare", "femnist": "flwrlabs/femnist", "cifar10": "uoft-cs/cifar10"}
NATURAL_ID = {"shakespeare": "character_id", "femnist": "writer_id"}
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@dataclass
class HubData:
    """x, y: every client's examples, concatenated; parts/heldout: index arrays into them; test: (x, y)."""

    x: torch.Tensor
    y: torch.Tensor
    parts: list[np.ndarray]
    heldout: list[np.ndarray]
    test: tuple[torch.Tensor, torch.Tensor] | None
    num_classes: int


def _partitioner(name: str, kind: str, n: int, alpha: float, seed: int, min_size: int):
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner

    if kind == "natural":
        if name not in NATURAL_ID:
            raise ValueError(f"{HUB_IDS[name]} has no natural client id; use fed.partition=iid|dirichlet")
        return NaturalIdPartitioner(partition_by=NATURAL_ID[name])
    if kind == "iid":
        return IidPartitioner(num_partitions=n)
    return DirichletPartitioner(num_partitions=n, partition_by="label", alpha=alpha, min_partition_size=min_size,
                                self_balancing=True, seed=seed)


def _tensors(name: str, rows) -> tuple[torch.Tensor, torch.Tensor]:
    """Hub rows -> model tensors. Shakespeare: x = 80 characters, y = x shifted by one plus the next one."""
    if name == "shakespeare":
        x = torch.tensor([[ord(c) % 256 for c in s] for s in rows["x"]], dtype=torch.long)  # byte-level ids
        nxt = torch.tensor([[ord(c) % 256] for c in rows["y"]], dtype=torch.long)
        return x, torch.cat([x[:, 1:], nxt], 1)
    key, label = ("image", "character") if name == "femnist" else ("img", "label")
    imgs = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in rows[key]])
    if name == "femnist":
        x = torch.from_numpy(imgs).unsqueeze(1)  # (N, 1, 28, 28)
        x = (x - 0.5) / 0.5
    else:
        x = torch.from_numpy((imgs - np.array(CIFAR_MEAN, np.float32)) / np.array(CIFAR_STD, np.float32))
        x = x.permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32)
    return x, torch.tensor(rows[label], dtype=torch.long)


def load_hub(name: str, kind: str, num_clients: int, alpha: float, seed: int, min_size: int,
             test_fraction: float) -> HubData:
    """The first ``num_clients`` partitions of a Hub dataset (see module docstring)."""
    if name not in HUB_IDS:
        raise ValueError(f"data.source=hub knows {sorted(HUB_IDS)}, not {name!r}")
    from flwr_datasets import FederatedDataset

    fds = FederatedDataset(dataset=HUB_IDS[name], partitioners={"train": _partitioner(name, kind, num_clients, alpha,
                                                                                         seed, min_size)})
    try:
        available = fds.partitioners["train"].num_partitions if kind != "natural" else None
        xs, ys, parts, held, start = [], [], [], [], 0
        for pid in range(num_clients):
            part = fds.load_partition(pid, "train")
            if available is None and pid == 0:
                available = fds.partitioners["train"].num_partitions
            x, y = _tensors(name, part[:])
            rng = np.random.default_rng(seed + pid)
            order = rng.permutation(len(y))
            k = int(round(test_fraction * len(y)))
            held.append(start + np.sort(order[:k]))
            parts.append(start + np.sort(order[k:]))
            xs.append(x)
            ys.append(y)
            start += len(y)
        test = _tensors(name, fds.load_split("test")[:]) if name == "cifar10" else None
    except (ConnectionError, OSError, FileNotFoundError) as e:
        raise RuntimeError(f"data.source=hub: {HUB_IDS[name]} could not be loaded from the Hugging Face Hub ({e}). "
                           "It needs the internet once (then it is cached); offline, use data=fed_shakespeare with "
                           "data.path=<tinyshakespeare.txt>, data=digits, or data=cifar10 with files on disk") from e
    except IndexError as e:
        raise ValueError(f"{HUB_IDS[name]} has only {available} partitions; lower fed.num_clients") from e
    num_classes = 256 if name == "shakespeare" else (62 if name == "femnist" else 10)
    return HubData(torch.cat(xs), torch.cat(ys), parts, held, test, num_classes)
