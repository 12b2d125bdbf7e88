"""The server's own small clean sample, and BatchNorm statistics recomputed on it for every model it evaluates
(``fed.bn_stats=server``).

Clients of different budgets train different views of one model, so the running statistics they upload, once
averaged, describe no view: a ResNet's 0.1-budget view scored 0.22 on digits with them and 0.94 with each batch's
own statistics (results.md, "BatchNorm"). HeteroFL (Diao et al. 2021, "static batch normalization") therefore
recomputes the statistics for each model rate after training, from data; precise-BN (Wu & Johnson 2021) recomputes
them for one model. Here the server recomputes them, for each view it evaluates, on its sample: the
``fed.screen_examples`` examples the screen uses (FLTrust's small clean set), drawn from the clients' held-out
splits, which no client trains on and which are disjoint from the test set. Only evaluations change: the global
state keeps the aggregated buffers, clients train as before, and models without BatchNorm are untouched."""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedlowrank.config import FederatedRun

from .aggregation import State

SAMPLE_SEED = 11  # the sample is drawn with run.seed + 11 (the screen's since it was added)
CALIBRATION_BATCH = 256


def server_sample(run: FederatedRun) -> TensorDataset | None:
    """The server's sample: ``fed.screen_examples`` examples (x, label) drawn without replacement from the pooled
    held-out splits, in index order; None where the task holds nothing out."""
    from .task import fed_data

    fd = fed_data(run)
    if not fd.heldout_parts or not sum(len(p) for p in fd.heldout_parts):
        return None
    pool = np.concatenate(fd.heldout_parts)
    idx = torch.as_tensor(np.sort(np.random.default_rng(run.seed + SAMPLE_SEED).choice(
        pool, min(run.fed.screen_examples, len(pool)), replace=False)), dtype=torch.long)
    y = fd.y_eval if fd.y_eval is not None else fd.y
    return TensorDataset(fd.x[idx], y[idx])


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``model`` that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, inputs: Iterable[torch.Tensor], device: torch.device | str = "cpu"
                        ) -> nn.Module:
    """``model`` (in place, moved to ``device``, returned in eval mode) with every BatchNorm's running mean and
    variance replaced by the cumulative average of its batch statistics over the batches ``inputs`` (PyTorch's
    ``momentum=None``: each batch weighs the same; the variance is each batch's unbiased one), the model's weights
    as they are. Every other layer stays in eval mode while this runs (dropout off)."""
    bns = batchnorms(model)
    model.to(device).eval()
    if not bns:
        return model
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        for x in inputs:
            model(x.to(device))
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.eval()
    return model


def eval_model(run: FederatedRun, state: State, device: torch.device | str = "cpu") -> nn.Module:
    """:func:`.client.model_from_state` on ``device``, in eval mode, its BatchNorm statistics recomputed on the
    server's sample under ``fed.bn_stats=server`` (a model without BatchNorm: loaded as it is)."""
    from .client import model_from_state

    model = model_from_state(run, state)
    if run.fed.bn_stats != "server" or not batchnorms(model):
        return model.to(device).eval()
    sample = server_sample(run)
    if sample is None:  # validation refuses server without held-out splits; a task that still holds none out
        raise RuntimeError("fed.bn_stats=server: this task holds no examples out to recompute statistics on")
    x = sample.tensors[0]  # sliced in order: no draw from torch's generator, unlike a loader's pass
    return recompute_batchnorm(model, (x[i:i + CALIBRATION_BATCH] for i in range(0, len(x), CALIBRATION_BATCH)),
                               device)
