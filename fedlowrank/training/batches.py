"""Mini-batches of in-memory tensors without per-example indexing.

``DataLoader(TensorDataset(x, y), batch_size, shuffle)`` fetches every example on its own and stacks them
again (most of a small model's step on a CPU). :class:`TensorBatches` slices the tensors instead and yields the
very same batches in the same order: per pass it draws from torch's global generator exactly what a
single-process DataLoader draws (its iterator's base seed, then the shuffling seed), so runs that switch
between the two stay bit-identical.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset


class TensorBatches:
    """Batches ``(x[idx], y[idx], ...)`` of a TensorDataset, as ``DataLoader(ds, batch_size, shuffle)`` gives
    them (``drop_last=False``, no workers, no sampler or generator of its own)."""

    def __init__(self, ds: TensorDataset, batch_size: int, shuffle: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.tensors, self.batch_size, self.shuffle = ds.tensors, batch_size, shuffle
        self.n = len(ds.tensors[0])

    def __len__(self) -> int:
        return (self.n + self.batch_size - 1) // self.batch_size

    def index_batches(self) -> list[torch.Tensor | slice]:
        """One pass's batches as indices (shuffled: index tensors; else slices), drawing from torch's global
        generator what a DataLoader draws when a pass starts."""
        torch.empty((), dtype=torch.int64).random_()  # the DataLoader iterator's base seed (unused here)
        if not self.shuffle:
            return [slice(i, i + self.batch_size) for i in range(0, self.n, self.batch_size)]
        g = torch.Generator()
        g.manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))  # RandomSampler's seed
        order = torch.randperm(self.n, generator=g)
        return [order[i:i + self.batch_size] for i in range(0, self.n, self.batch_size)]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for idx in self.index_batches():
            yield tuple(t[idx] for t in self.tensors)


def batches(ds: Dataset, batch_size: int, shuffle: bool = False):
    """:class:`TensorBatches` for a TensorDataset, else a DataLoader with the same arguments."""
    if isinstance(ds, TensorDataset):
        return TensorBatches(ds, batch_size, shuffle)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle)
