"""``fed.batched_clients``: the clients of a round train as one vectorized computation.

Their parameters are stacked (K, ...) and every local step is one ``vmap(grad(...))`` of the model through
``torch.func.functional_call``, followed by each client's SGD-with-momentum update, exactly as
``torch.optim.SGD`` computes it. Clients of different budgets train together: models that differ only in their
factorized layers' ranks are zero-padded to the largest (a zero slot adds nothing to U·V and gets a zero gradient,
so it stays zero), and their replies are cut back to their own ranks. ``fed.nested``: each client draws its
sub-model per step as the sequential client does (:func:`client.nested_sampler`, its own generator); the slots above
the drawn rank are masked out of the forward pass, so they get the zero gradient the sliced factors get.

Each client keeps everything that makes it itself: its dropout draw and seed (:func:`client.prepare_client`), its
data order (the draws ``TensorBatches`` makes, per epoch it starts), its own number of steps (a client whose data
ran out stops updating: masked), its last short batch (padded, masked out of the loss). The replies agree with the sequential loop to float rounding (``tests/test_batched_clients.py``).
Plain local SGD on classification tasks only; anything else is refused before any work (:func:`unsupported`).
"""
from __future__ import annotations

import math
import random
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from fedlowrank.config import TEXT_SPECS, FederatedRun
from fedlowrank.lowrank.factorize import lowrank_modules
from fedlowrank.models.build import TEXT_FAMILIES
from fedlowrank.training.batches import TensorBatches

from .aggregation import State
from .client import finish_client, nested_sampler, prepare_client


def unsupported(run: FederatedRun) -> str | None:
    """Why ``run`` cannot train its clients batched (None: it can)."""
    f = run.fed
    if run.method.get("name", "none") != "none":
        return f"method={run.method.get('name')} (its clients do more than plain SGD)"
    for key, val in (("fed.prox_mu", f.prox_mu), ("fed.frob_decay", f.frob_decay),
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
    sampler: Callable[[int], None] | None  # fed.nested: sets the step's active ranks on ``model``


def train_group(run: FederatedRun, jobs: list[tuple[int, State, int]], num_partitions: int) -> list:
    """Train ``jobs`` ((partition id, received state, round)) together, one vectorized computation per group of
    models that differ only in rank (:func:`rank_groups`); per job its (payload, metrics) or the exception it
    raised."""
    out: list = [None] * len(jobs)
    clients: list[_Client] = []
    for i, (pid, state, rnd) in enumerate(jobs):
        try:
            model, method, budget, device, ds = prepare_client(run, pid, num_partitions, state, rnd)
            sampler = nested_sampler(model, run, budget, random.Random(f"nested-{run.seed}-{rnd}-{pid}")) \
                if run.fed.nested else None
        except Exception as e:  # noqa: BLE001 - a failing client fails alone
            out[i] = e
            continue
        clients.append(_Client(i, pid, model, method, ds, state, _orders(ds, run.fed), torch.get_rng_state(),
                               device, sampler))
    for members in rank_groups([c.model for c in clients]):
        group = [clients[j] for j in members]
        for c, st in zip(group, _train(run, group)):
            torch.set_rng_state(c.rng)  # where this client's own generator stood after training
            try:
                out[c.slot] = finish_client(run, c.pid, c.model, c.method, st, len(c.data), c.state)
            except Exception as e:  # noqa: BLE001
                out[c.slot] = e
    return out


def _rank_axes(model: nn.Module) -> dict[str, int]:
    """Parameter name → the axis of its rank slots, for the factors of factorized layers: U (out, r) → 1,
    V (r, fan_in) → 0."""
    return {f"{n}{'.' if n else ''}{f}": ax for n in lowrank_modules(model) for f, ax in (("U", 1), ("V", 0))}


def rank_groups(models: list[nn.Module]) -> list[list[int]]:
    """Indices of ``models`` grouped so that a group's models have the same parameters, shapes equal except along
    the rank axis of factorized layers' factors (in order of first appearance)."""
    groups: dict[tuple, list[int]] = {}
    for i, model in enumerate(models):
        axes = _rank_axes(model)
        sig = tuple((n, tuple(-1 if d == axes.get(n) else s for d, s in enumerate(p.shape)), p.dtype)
                    for n, p in model.named_parameters())
        groups.setdefault(sig, []).append(i)
    return list(groups.values())


def _stack_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """(K, *max shape): each tensor zero-padded at the end of every axis to the largest."""
    shape = [max(s) for s in zip(*(t.shape for t in tensors))]
    out = tensors[0].new_zeros(len(tensors), *shape)
    for k, t in enumerate(tensors):
        out[(k, *(slice(0, s) for s in t.shape))] = t
    return out


def _loss(model: nn.Module, axes: dict[str, int]):
    """(params, masks, x (B, ...), y (B,), mask (B,)) -> (mean loss over the real examples, (loss, correct));
    ``masks``: per factorized layer's factor, the (r,) 0/1 mask of the step's active rank slots (fed.nested)."""
    from torch.func import functional_call

    def loss(params: dict, masks: dict, x: torch.Tensor, y: torch.Tensor, m: torch.Tensor):
        if masks:
            params = {**params, **{n: params[n] * (mk if axes[n] == 1 else mk[:, None]) for n, mk in masks.items()}}
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


def _rank_masks(group: list[_Client], s: int, params: dict[str, torch.Tensor], axes: dict[str, int], device):
    """fed.nested: step ``s``'s sub-model of every client (its own draw), as (K, r) masks per factor."""
    if group[0].sampler is None:
        return {}
    active = []
    for c in group:
        if s < len(c.orders):
            c.sampler(s)  # type: ignore[misc]  # the sequential client's draw, on its own generator
        layers = lowrank_modules(c.model)
        active.append({n: m.active_rank or m.rank for n, m in layers.items()})
        for m in layers.values():
            m.set_active_rank(None)
    masks = {}
    for n, ax in axes.items():
        layer = n.rsplit(".", 1)[0] if "." in n else ""
        slots = torch.arange(params[n].shape[ax + 1], device=device)
        masks[n] = (slots[None] < torch.tensor([a[layer] for a in active], device=device)[:, None]).to(params[n].dtype)
    return masks


@torch.no_grad()
def _train(run: FederatedRun, group: list[_Client]) -> list[dict]:
    """Every client's local SGD, vectorized; the models end with their trained weights; per client its stats."""
    from torch.func import grad, vmap

    f, K, device = run.fed, len(group), group[0].device
    models = [c.model for c in group]
    skeleton = max(models, key=lambda m: sum(p.numel() for p in m.parameters()))  # the largest ranks
    axes = _rank_axes(skeleton)
    names = [n for n, _ in skeleton.named_parameters()]
    params = {n: _stack_padded([dict(m.named_parameters())[n].detach() for m in models]) for n in names}
    bufs: dict[str, torch.Tensor] = {}
    step_fn = vmap(grad(_loss(skeleton, axes), has_aux=True))
    xs, ys, orders = [c.data.tensors[0] for c in group], [c.data.tensors[1] for c in group], [c.orders for c in group]
    loss_sum, correct, seen = torch.zeros(K, dtype=torch.float64), torch.zeros(K, dtype=torch.float64), [0] * K
    skeleton.train()
    for s in range(max((len(o) for o in orders), default=0)):
        x, y, m, active = _batch(xs, ys, orders, s, f.batch_size, device)
        masks = _rank_masks(group, s, params, axes, device)
        with torch.enable_grad():
            grads, (loss, hits) = step_fn(params, masks, x, y, m)
        _sgd_step(f, params, grads, bufs, active)
        n_k = m.sum(1).double().cpu()
        loss_sum += loss.double().cpu() * n_k
        correct += hits.double().cpu()
        seen = [seen[k] + int(n_k[k]) for k in range(K)]
    for k, model in enumerate(models):
        for n, p in model.named_parameters():
            p.copy_(params[n][(k, *(slice(0, s) for s in p.shape))])  # cut back to the client's own ranks
    return [{"loss": float(loss_sum[k]) / max(1, seen[k]), "accuracy": float(correct[k]) / max(1, seen[k]),
             "steps": float(len(orders[k]))} for k in range(K)]


def _sgd_step(f, params: dict, grads: dict, bufs: dict, active: torch.Tensor) -> None:
    """torch.optim.SGD's update (weight decay, momentum) of every active client's parameters, in place of ``params``."""
    K = active.shape[0]
    for n in params:
        on = active.view((K,) + (1,) * (params[n].dim() - 1))
        g = grads[n] if not f.weight_decay else grads[n].add(params[n], alpha=f.weight_decay)
        if f.momentum:
            b = bufs.get(n)
            b = g.clone() if b is None else torch.where(on, b.mul(f.momentum).add(g), b)
            bufs[n] = b
            g = b
        params[n] = torch.where(on, params[n].add(g, alpha=-f.lr), params[n])
