"""Server optimizers on the aggregated change (``fed.server_opt``): FedAvgM (Hsu et al. 2019) and FedAdam,
FedYogi, FedAdagrad (Reddi et al. 2021, "Adaptive Federated Optimization"), with the update rules and defaults of
Flower 1.41's strategies of those names.

The change is Δ = aggregated − global, the aggregate being whatever the strategy's rule produced (fedavg, fedlmt,
slice, product; robust or not), so the optimizers work with every rule. For ``slice``, ``fedlmt`` and dense
tensors, Δ is taken per tensor (a rank slot means the same thing every round). ``product`` re-factorizes the
global model each round, so its factors change basis: there Δ and the optimizer state live in the dense product
``W = U V`` of each layer, and the result is factorized again at the aggregate's rank (truncated SVD, balanced
factors). A tensor whose shape changed (a rank-adaptive method grew it) restarts its state.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .aggregation import State, factor_prefixes

log = logging.getLogger(__name__)
SERVER_OPTS = ("none", "avgm", "adam", "yogi", "adagrad")
DEFAULT_LR = {"avgm": 1.0, "adam": 0.1, "yogi": 0.01, "adagrad": 0.1}  # Flower 1.41's defaults


@dataclass
class ServerOptConfig:
    kind: str = "none"
    lr: float | None = None  # None: Flower's default for the kind (DEFAULT_LR)
    momentum: float = 0.9  # avgm
    beta_1: float = 0.9  # adam, yogi
    beta_2: float = 0.99  # adam, yogi
    tau: float = 1e-3  # adam, yogi, adagrad: adaptivity


class ServerOptimizer:
    """Stateful server update ``step(round, global, aggregated) -> new global``; ``state()`` / ``load()`` carry
    the moments across a resume."""

    def __init__(self, cfg: ServerOptConfig, product_space: bool) -> None:
        self.cfg, self.product_space = cfg, product_space
        self.lr = cfg.lr if cfg.lr is not None else DEFAULT_LR[cfg.kind]
        self.m: dict[str, Tensor] = {}
        self.v: dict[str, Tensor] = {}

    def step(self, rnd: int, current: State, aggregated: State) -> State:
        """The new global model after round ``rnd`` (1-based, counted over the whole run)."""
        cur, agg, ranks = self._space(current), self._space(aggregated), self._ranks(aggregated)
        new = {}
        for k, a in agg.items():
            c = cur.get(k)
            if c is None or c.shape != a.shape or not a.is_floating_point():
                self.m.pop(k, None), self.v.pop(k, None)
                new[k] = a
                continue
            new[k] = self._update(rnd, k, c.double(), a.double()).to(a.dtype)
        return self._back(new, aggregated, ranks)

    def _update(self, rnd: int, k: str, x: Tensor, agg: Tensor) -> Tensor:
        c = self.cfg
        if c.kind == "avgm":  # Flower's FedAvgM: pseudo-gradient old - new, momentum buffer, SGD step
            g = x - agg
            self.m[k] = g if k not in self.m else c.momentum * self.m[k] + g
            return x - self.lr * self.m[k]
        delta = agg - x
        b1 = 0.0 if c.kind == "adagrad" else c.beta_1
        m = self.m.get(k, torch.zeros_like(delta))
        self.m[k] = b1 * m + (1 - b1) * delta
        v = self.v.get(k, torch.zeros_like(delta))
        if c.kind == "adam":
            self.v[k] = c.beta_2 * v + (1 - c.beta_2) * delta**2
            lr = self.lr * math.sqrt(1 - c.beta_2 ** (rnd + 1.0)) / (1 - c.beta_1 ** (rnd + 1.0))
        elif c.kind == "yogi":
            self.v[k] = v - (1.0 - c.beta_2) * delta**2 * torch.sign(v - delta**2)
            lr = self.lr
        else:  # adagrad
            self.v[k] = v + delta**2
            lr = self.lr
        return x + lr * self.m[k] / (self.v[k].sqrt() + c.tau)

    def _space(self, state: State) -> State:
        """The tensors the optimizer acts on: ``state`` itself, or with ``product`` each layer's U, V replaced
        by ``<layer>.W = U V``."""
        if not self.product_space:
            return state
        out = dict(state)
        for p in factor_prefixes(state):
            U, V = out.pop(f"{p}.U"), out.pop(f"{p}.V")
            out[f"{p}.W"] = U.double() @ V.double()  # (out, r) @ (r, in)
        return out

    def _ranks(self, state: State) -> dict[str, int]:
        return {p: state[f"{p}.U"].shape[1] for p in factor_prefixes(state)} if self.product_space else {}

    def _back(self, new: State, like: State, ranks: dict[str, int]) -> State:
        """Factorize each ``<layer>.W`` again at the aggregate's rank: best rank-r factors, U = P√S, V = √S Qᵀ."""
        for p, r in ranks.items():
            W = new.pop(f"{p}.W").double()
            P, S, Qh = torch.linalg.svd(W, full_matrices=False)
            root = S[:r].sqrt()
            new[f"{p}.U"] = (P[:, :r] * root).to(like[f"{p}.U"].dtype)
            new[f"{p}.V"] = (root[:, None] * Qh[:r]).to(like[f"{p}.V"].dtype)
        return {k: new[k] for k in like}

    def state(self) -> dict[str, Tensor]:
        return {**{f"m/{k}": t for k, t in self.m.items()}, **{f"v/{k}": t for k, t in self.v.items()}}

    def load(self, tensors: dict[str, Tensor]) -> None:
        self.m = {k[2:]: t.double() for k, t in tensors.items() if k.startswith("m/")}
        self.v = {k[2:]: t.double() for k, t in tensors.items() if k.startswith("v/")}
