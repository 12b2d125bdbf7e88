"""``fed.batched_clients``: the clients of a round that share a budget train as one vectorized computation.

Their parameters are stacked (K, ...) and every local step is one ``vmap(grad(...))`` of the model through
``torch.func.functional_call``, followed by each client's SGD-with-momentum update, exactly as
``torch.optim.SGD`` computes it. Each client keeps everything that makes it itself: its dropout draw and seed
(:func:`client.prepare_client`), its data order (the draws ``TensorBatches`` makes, per epoch it starts), its own
number of steps (a client whose data ran out stops updating: masked), its last short batch (padded, masked out
of the loss). The replies agree with the sequential loop to float rounding (``tests/test_batched_clients.py``).
Plain local SGD on classification tasks only; anything else is refused before any work (:func:`unsupported`).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from fedlowrank.config import TEXT_SPECS, FederatedRun
from fedlowrank.models.build import TEXT_FAMILIES
from fedlowrank.training.batches import TensorBatches

from .aggregation import State
from .client import finish_client, prepare_client


def unsupported(run: FederatedRun) -> str | None:
    """Why ``run`` cannot train its clients batched (None: it can)."""
    f = run.fed
    if run.method.get("name", "none") != "none":
        return f"method={run.method.get('name')} (its clients do more than plain SGD)"
    for key, val in (("fed.nested", f.nested), ("fed.prox_mu", f.prox_mu), ("fed.frob_decay", f.frob_decay),
                     ("fed.bf16", f.bf16)):
        if val:
            return f"{key}={val}"
    if run.data.name in TEXT_SPECS or run.model.get("family") in TEXT_FAMILIES:
        return "a text task (sequence models)"
    from .task import build_model

    for m in build_model(run).modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) or (isinstance(m, nn.Dropout) and m.p > 0):
            return f"a {type(m).__name__} layer (state or randomness inside the forward pass)"
    return None


def _orders(ds, f) -> list[torch.Tensor]:
    """The index batches the sequential client trains on: ``TensorBatches``' passes, as many as it starts."""
    loader = TensorBatches(ds, f.batch_size, shuffle=True)
    epochs = f.local_epochs if f.local_steps is None or len(loader) == 0 else \
        min(f.local_epochs, math.ceil(f.local_steps / len(loader)))
    out = [idx for _ in range(epochs) for idx in loader.index_batches()]
    return out[:f.local_steps] if f.local_steps is not None else out


class _Client(NamedTuple):
    """A prepared member of a group: where its result goes, and what its reply is built from."""

    slot: int
    pid: int
    model: nn.Module
    method: object
    data: TensorDataset
    state: State
    orders: list[torch.Tensor]
    rng: torch.Tensor  # torch's generator state after the client's own draws
    device: torch.device


def train_group(run: FederatedRun, jobs: list[tuple[int, State, int]], num_partitions: int) -> list:
    """Train ``jobs`` ((partition id, received state, round), one budget) together; per job its
    (payload, metrics) or the exception it raised."""
    out: list = [None] * len(jobs)
    clients: list[_Client] = []
    for i, (pid, state, rnd) in enumerate(jobs):
        try:
            model, method, _, device, ds = prepare_client(run, pid, num_partitions, state, rnd)
        except Exception as e:  # noqa: BLE001 - a failing client fails alone
            out[i] = e
            continue
        clients.append(_Client(i, pid, model, method, ds, state, _orders(ds, run.fed), torch.get_rng_state(), device))
    stats = _train(run, [c.model for c in clients], [c.data for c in clients], [c.orders for c in clients],
                   clients[0].device) if clients else []
    for c, st in zip(clients, stats):
        torch.set_rng_state(c.rng)  # where this client's own generator stood after training
        try:
            out[c.slot] = finish_client(run, c.pid, c.model, c.method, st, len(c.data), c.state)
        except Exception as e:  # noqa: BLE001
            out[c.slot] = e
    return out


def _loss(model: nn.Module):
    """(params, x (B, ...), y (B,), mask (B,)) -> (mean loss over the real examples, (loss, correct))."""
    from torch.func import functional_call

    def loss(params: dict, x: torch.Tensor, y: torch.Tensor, m: torch.Tensor):
        logits = functional_call(model, params, (x,)).float()
        ce = F.cross_entropy(logits, y, reduction="none")
        mean = (ce * m).sum() / m.sum().clamp_min(1)
        return mean, (mean.detach(), ((logits.argmax(-1) == y).float() * m).sum())

    return loss


def _batch(xs, ys, orders, s: int, width: int, device):
    """Step ``s``'s padded batch of every client: x (K, width, ...), y (K, width), mask (K, width), active (K,)."""
    K = len(xs)
    x = torch.zeros(K, width, *xs[0].shape[1:], dtype=xs[0].dtype)
    y = torch.zeros(K, width, dtype=ys[0].dtype)
    m = torch.zeros(K, width)
    for k in range(K):
        if s < len(orders[k]):
            idx = orders[k][s]
            x[k, :len(idx)], y[k, :len(idx)], m[k, :len(idx)] = xs[k][idx], ys[k][idx], 1.0
    return x.to(device), y.to(device), m.to(device), torch.tensor([s < len(o) for o in orders], device=device)


@torch.no_grad()
def _train(run: FederatedRun, models: list[nn.Module], datasets, orders, device) -> list[dict]:
    """Every model's local SGD, vectorized; the models end with their trained weights; per model its stats."""
    from torch.func import grad, vmap

    f, K = run.fed, len(models)
    names = [n for n, _ in models[0].named_parameters()]
    params = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in models]) for n in names}
    bufs: dict[str, torch.Tensor] = {}
    step_fn = vmap(grad(_loss(models[0]), has_aux=True))
    xs, ys = [d.tensors[0] for d in datasets], [d.tensors[1] for d in datasets]
    loss_sum, correct, seen = torch.zeros(K, dtype=torch.float64), torch.zeros(K, dtype=torch.float64), [0] * K
    models[0].train()
    for s in range(max((len(o) for o in orders), default=0)):
        x, y, m, active = _batch(xs, ys, orders, s, f.batch_size, device)
        with torch.enable_grad():
            grads, (loss, hits) = step_fn(params, x, y, m)
        for n in names:
            shape = (K,) + (1,) * (params[n].dim() - 1)
            on = active.view(shape)
            g = grads[n] if not f.weight_decay else grads[n].add(params[n], alpha=f.weight_decay)
            if f.momentum:
                b = bufs.get(n)
                b = g.clone() if b is None else torch.where(on, b.mul(f.momentum).add(g), b)
                bufs[n] = b
                g = b
            params[n] = torch.where(on, params[n].add(g, alpha=-f.lr), params[n])
        n_k = m.sum(1).double().cpu()
        loss_sum += loss.double().cpu() * n_k
        correct += hits.double().cpu()
        seen = [seen[k] + int(n_k[k]) for k in range(K)]
    for k, model in enumerate(models):
        for n, p in model.named_parameters():
            p.copy_(params[n][k])
    return [{"loss": float(loss_sum[k]) / max(1, seen[k]), "accuracy": float(correct[k]) / max(1, seen[k]),
             "steps": float(len(orders[k]))} for k in range(K)]
