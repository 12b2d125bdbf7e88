"""Leave-one-out screening of client updates (``fed.screen=loo``): Reject On Negative Influence (Nelson et al. 2008;
in federated learning Fang et al. 2020's loss-function based rejection), on a small validation sample the server
holds, at every client budget.

Each round the server aggregates the valid updates with and without each client, cuts both results to every
budget of the run, and measures the loss on its sample. A client whose inclusion raises that loss at some budget by
more than ``fed.screen_tolerance`` (relative) is rejected. Norms and cosines cannot separate an attacker from an
honest client whose budget or data differ (their changes differ in size by 20x and point in near-orthogonal
directions); the loss the aggregate reaches can. The sample is drawn from the clients' held-out splits, which no
client trains on (a deployment gives the server its own small clean set, as FLTrust assumes)."""
from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedlowrank.config import ConfigError, FederatedRun
from fedlowrank.training.batches import batches
from fedlowrank.training.loop import evaluate_classifier

from .aggregation import State

log = logging.getLogger(__name__)
MIN_CLIENTS = 3  # with fewer, "without client i" is one other client's update: no majority to compare with


class LooScreen:
    """The server's validation sample and the run's budgets; :meth:`flagged` names the clients to reject."""

    def __init__(self, run: FederatedRun, method) -> None:
        from .task import fed_data

        fd = fed_data(run)
        if not fd.heldout_parts or not sum(len(p) for p in fd.heldout_parts):
            raise ConfigError("fed.screen=loo needs clients' held-out splits to draw the server's sample from "
                              "(image tasks: fed.client_holdout > 0)")
        pool = np.concatenate(fd.heldout_parts)
        idx = torch.as_tensor(np.sort(np.random.default_rng(run.seed + 11).choice(
            pool, min(run.fed.screen_examples, len(pool)), replace=False)), dtype=torch.long)
        y = fd.y_eval if fd.y_eval is not None else fd.y
        self.loader = batches(TensorDataset(fd.x[idx], y[idx]), 256)
        self.run, self.method = run, method
        budgets = {tuple(sorted(run.fed.budget(i).items())) for i in range(run.fed.num_clients)}
        self.budgets = [dict(b) for b in sorted(budgets)] if method.budget_views() else [None]

    def losses(self, state: State) -> list[float]:
        """Loss on the sample of ``state`` cut to each budget (the whole model when budgets share one view)."""
        from .client import model_from_state

        out = []
        for b in self.budgets:
            model = model_from_state(self.run, state if b is None else self.method.view(state, b))
            out.append(evaluate_classifier(model, self.loader)["loss"])
        return out

    def flagged(self, valid: list, combine: Callable[[list], State]) -> dict[int, tuple[float, str]]:
        """Index in ``valid`` -> (relative loss increase its inclusion causes, at which budget), for every client
        above the tolerance. ``combine`` aggregates a list of valid entries into a global state."""
        if len(valid) < MIN_CLIENTS:
            return {}
        full = self.losses(combine(valid))
        out = {}
        for i in range(len(valid)):
            without = self.losses(combine(valid[:i] + valid[i + 1:]))
            worst, at = max(self.rises(full, without, self.run.fed.budget(valid[i][0])), key=lambda r: r[0])
            if worst > self.run.fed.screen_tolerance:
                out[i] = (float(worst), "the whole model" if at is None else "_".join(f"{k}{v}" for k, v in at.items()))
        return out

    def rises(self, full: list[float], without: list[float], own: dict) -> list[tuple[float, dict | None]]:
        """Relative loss rise at each budget at or above the client's ``own``: its slots reach those budgets'
        models; a smaller budget can lose from any larger client's honest change to the shared slots."""
        (key, mine), = own.items()
        return [((f - w) / max(w, 1e-12) if np.isfinite(f) else np.inf, b) for f, w, b in zip(full, without, self.budgets)
                if b is None or key not in b or b[key] >= mine]
