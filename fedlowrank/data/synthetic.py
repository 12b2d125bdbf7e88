"""Synthetic(α, β), the federated benchmark of FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous
Networks", Sec. 5.1; also in LEAF), generated offline and seeded.

Client k has n_k = ⌊e^{N(4, 2)}⌋ + 50 examples (a power law of client sizes). Its model is y = argmax(W_k x + b_k)
with W_k ∈ R^{10×60}, b_k ∈ R^10 drawn elementwise from N(u_k, 1), u_k ~ N(0, α²) (model heterogeneity); its
inputs x ~ N(v_k, Σ), Σ = diag(j^{-1.2}), j = 1..60, with v_k elementwise from N(B_k, 1), B_k ~ N(0, β²) (data
heterogeneity). ``iid``: one W, b ~ N(0, 1) for every client and x ~ N(0, Σ). (The paper writes N(0, α); its
generator draws with standard deviation α, as here.) Each client keeps ``test_fraction`` of its examples as its
own held-out split; the pooled test set is the union of those.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

DIM, CLASSES = 60, 10


@dataclass
class SyntheticData:
    """x: (N, 60) float32, y: (N,) int64; per client its train / held-out indices and (W, b) of its model."""

    x: torch.Tensor
    y: torch.Tensor
    train_parts: list[np.ndarray]
    heldout_parts: list[np.ndarray]
    models: list[tuple[np.ndarray, np.ndarray]]  # (W (10, 60), b (10,)) per client


def client_sizes(rng: np.random.Generator, n: int) -> np.ndarray:
    """⌊lognormal(4, 2)⌋ + 50 examples per client."""
    return rng.lognormal(4, 2, n).astype(np.int64) + 50


def generate(n_clients: int, alpha: float, beta: float, iid: bool = False, seed: int = 0,
             test_fraction: float = 0.2, max_per_client: int | None = None) -> SyntheticData:
    """Synthetic(α, β) for ``n_clients`` clients (``iid``: Synthetic-IID); ``max_per_client`` caps the power law's
    tail (None: uncapped, as the paper)."""
    rng = np.random.default_rng(seed)
    sizes = client_sizes(rng, n_clients)
    if max_per_client is not None:
        sizes = np.minimum(sizes, max_per_client)
    sd = np.sqrt(np.arange(1, DIM + 1, dtype=np.float64) ** -1.2)  # Σ's diagonal, square-rooted
    W0, b0 = rng.normal(0, 1, (CLASSES, DIM)), rng.normal(0, 1, CLASSES)
    total = int(sizes.sum())
    x_all, y_all = np.empty((total, DIM), dtype=np.float32), np.empty(total, dtype=np.int64)  # filled in place
    models, train, held, start = [], [], [], 0
    for n in sizes:
        if iid:
            W, b, v = W0, b0, np.zeros(DIM)
        else:
            u, B = rng.normal(0, alpha), rng.normal(0, beta)
            W, b = rng.normal(u, 1, (CLASSES, DIM)), rng.normal(u, 1, CLASSES)
            v = rng.normal(B, 1, DIM)
        x = rng.standard_normal((n, DIM))  # the draws rng.normal(0, 1, ...) makes; scaled and shifted in place:
        x *= sd
        x += v  # N(v, Σ), Σ diagonal
        x_all[start:start + n] = x  # the float32 the tensor holds; labels come from the float64 x
        y_all[start:start + n] = np.argmax(x @ W.T + b, axis=1)  # softmax is monotone: argmax of the logits
        models.append((W, b))
        idx = start + rng.permutation(n)
        h = max(1, int(round(test_fraction * n)))
        held.append(np.sort(idx[:h]))
        train.append(np.sort(idx[h:]))
        start += n
    return SyntheticData(torch.from_numpy(x_all), torch.from_numpy(y_all), train, held, models)
