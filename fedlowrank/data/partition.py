"""Client partitions built with flwr-datasets partitioners (IID, Dirichlet(α) over labels, natural ids) and
per-group held-out splits."""
from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger(__name__)


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
    """Index arrays, one per client, covering the training set (deterministic for a seed). ``iid``: Flower's
    ``IidPartitioner`` (contiguous shards of the given order, the first ``N mod n`` one longer), computed here
    without importing flwr-datasets (0.9 s)."""
    if kind == "iid":
        if not 1 <= num_partitions <= len(labels):  # Flower's partitioner fails there too (IndexError)
            raise ValueError(f"cannot split {len(labels)} examples into {num_partitions} IID partitions")
        div, mod = divmod(len(labels), num_partitions)
        starts = [div * i + min(i, mod) for i in range(num_partitions + 1)]
        return [np.arange(starts[i], starts[i + 1]) for i in range(num_partitions)]
    from datasets import Dataset

    ds = Dataset.from_dict({"idx": np.arange(len(labels)), "label": labels.numpy()})
    part = make_partitioner(kind, num_partitions, alpha, seed, min_size)
    part.dataset = ds
    return [np.asarray(part.load_partition(i)["idx"]) for i in range(num_partitions)]


def holdout_mask(groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """(N,) bool: a seeded ``fraction`` of each group's items (round(fraction · size), so a group of one keeps its
    item for training), drawn group by group in ascending group order."""
    rng = np.random.default_rng(seed)
    test = np.zeros(len(groups), dtype=bool)
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        test[rng.choice(idx, size=int(round(fraction * len(idx))), replace=False)] = True
    return test


def natural_split(groups: np.ndarray, test: np.ndarray, num_clients: int, min_size: int, what: str, unit: str
                  ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(train, test) index arrays per client, one group each (a speaking role, an instruction category), via
    flwr-datasets' NaturalIdPartitioner: groups with fewer than ``min_size`` training items are left out, the
    ``num_clients`` with the most are kept (ties by group index), in group order. More clients than such groups is
    a ValueError naming ``what`` and ``unit``."""
    from datasets import Dataset
    from datasets import utils as hf_tqdm
    from flwr_datasets.partitioner import NaturalIdPartitioner

    train_idx = np.flatnonzero(~test)
    counts = np.bincount(groups[train_idx], minlength=int(groups.max()) + 1)
    eligible = [g for g in np.argsort(-counts, kind="stable") if counts[g] >= max(1, min_size)]
    if num_clients > len(eligible):
        raise ValueError(f"natural partition: {num_clients} clients requested but only {len(eligible)} {what} have "
                         f">= {min_size} {unit} (fed.min_partition_size); lower fed.num_clients")
    keep = sorted(int(g) for g in eligible[:num_clients])
    mine = train_idx[np.isin(groups[train_idx], keep)]
    part = NaturalIdPartitioner(partition_by="group")
    part.dataset = Dataset.from_dict({"idx": mine, "group": groups[mine]})
    by_group = {}
    quiet = not hf_tqdm.are_progress_bars_disabled()
    if quiet:
        hf_tqdm.disable_progress_bars()
    try:
        for pid in range(part.num_partitions):
            rows = part.load_partition(pid)
            by_group[int(rows["group"][0])] = np.asarray(rows["idx"])
    finally:
        if quiet:
            hf_tqdm.enable_progress_bars()
    test_idx = np.flatnonzero(test)
    train = [by_group[g] for g in keep]
    held = [test_idx[groups[test_idx] == g] for g in keep]
    log.info("natural partition: %d %s, %d-%d %s each", len(keep), what, min(len(t) for t in train),
             max(len(t) for t in train), unit)
    return train, held
