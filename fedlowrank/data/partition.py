"""Client partitions built with flwr-datasets partitioners (IID, Dirichlet(α) over labels)."""
from __future__ import annotations

import numpy as np
import torch


def make_partitioner(kind: str, num_partitions: int, alpha: float = 0.5, seed: int = 42, min_size: int = 10):
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if kind == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if kind == "dirichlet":
        if alpha <= 0:
            raise ValueError(f"Dirichlet alpha must be > 0, got {alpha}")
        return DirichletPartitioner(num_partitions=num_partitions, partition_by="label", alpha=alpha,
                                    min_partition_size=min_size, self_balancing=True, seed=seed)
    raise ValueError(f"unknown partitioning {kind!r} (iid|dirichlet)")


def partition_indices(labels: torch.Tensor, kind: str, num_partitions: int, alpha: float = 0.5,
                      seed: int = 42, min_size: int = 10) -> list[np.ndarray]:
    """Index arrays, one per client, covering the training set (deterministic for a seed)."""
    from datasets import Dataset

    ds = Dataset.from_dict({"idx": np.arange(len(labels)), "label": labels.numpy()})
    part = make_partitioner(kind, num_partitions, alpha, seed, min_size)
    part.dataset = ds
    return [np.asarray(part.load_partition(i)["idx"]) for i in range(num_partitions)]
