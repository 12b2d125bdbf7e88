"""Client-side logic: rebuild the model at the received ranks, train locally, report."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import random

import numpy as np
import torch
from torch import nn

from fedlowrank.config import ConfigError, FederatedRun
from fedlowrank.lowrank import conform_to_state, count_params, lowrank_modules
from fedlowrank.lowrank.layers import rank_from_budget
from fedlowrank.training.batches import batches
from fedlowrank.training.loop import train_classifier

from .aggregation import State
from .robust import value_bounds
from .task import build_model, fed_data

log = logging.getLogger(__name__)


class SimulatedClientFailure(RuntimeError):
    """Raised on purpose to simulate a device dropping out of a round."""


def _with_partitions(run: FederatedRun, num_partitions: int) -> FederatedRun:
    """The run as seen by a node told there are ``num_partitions`` partitions (a deployment's node config)."""
    if num_partitions == run.fed.num_clients:
        return run
    return dataclasses.replace(run, fed=dataclasses.replace(run.fed, num_clients=num_partitions))


def client_partitions(run: FederatedRun, num_partitions: int) -> list[np.ndarray]:
    """Index arrays of every client's training examples (cached per process)."""
    return fed_data(_with_partitions(run, num_partitions)).train_parts


def client_data(run: FederatedRun, partition_id: int, num_partitions: int):
    return fed_data(_with_partitions(run, num_partitions)).client_train(partition_id)


def model_from_state(run: FederatedRun, state: State) -> nn.Module:
    """Dense skeleton of the configured model, reshaped to the factors/adapters in ``state``, loaded
    (``method=lora``: the shared pretrained base with the adapters of ``state``)."""
    if run.method.get("name") == "lora":
        from .lora import lora_model

        return lora_model(run, state)
    model = build_model(run)
    conform_to_state(model, state)
    model.load_state_dict(state, strict=True)
    return model


def compute_device(run: FederatedRun) -> torch.device:
    """Where clients train and the server evaluates: ``fed.device``; ``auto`` is CUDA when the run reserves GPUs
    for its clients (``fed.client_gpus > 0``) and this process sees one (Ray gives each client actor its share)."""
    d = run.fed.device
    if d == "auto":
        d = "cuda" if run.fed.client_gpus > 0 and torch.cuda.is_available() else "cpu"
    if d == "cuda" and not torch.cuda.is_available():
        raise ConfigError("fed.device=cuda, but this process sees no CUDA device (fed.device=auto falls back to cpu)")
    return torch.device(d)


def autocast(run: FederatedRun, device: torch.device):
    """bf16 autocast on ``device`` with ``fed.bf16``, else nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if run.fed.bf16 else contextlib.nullcontext()


def layer_dims(layer: nn.Module) -> tuple[int, int]:
    """(m, n) of a factorized layer's U (m×r) · V (r×n)."""
    return layer.U.shape[0], layer.V.shape[1]


def check_budget(model: nn.Module, budget: dict[str, float | int]) -> None:
    """A device refuses a model larger than its rank budget."""
    for name, layer in lowrank_modules(model).items():
        allowed = rank_from_budget(layer.full_rank, **budget, dims=layer_dims(layer))  # type: ignore[arg-type]
        if layer.rank > allowed:
            raise ValueError(f"layer {name} has rank {layer.rank} > budget {allowed} ({budget})")


def prepare_client(run: FederatedRun, partition_id: int, num_partitions: int, state: State, server_round: int):
    """A client's start of a round: its dropout draw, its seed, the received model at its budget on the run's
    device, and its data. Returns (model, method, budget, device, dataset)."""
    f = run.fed
    rng = random.Random(f"{run.seed}-{server_round}-{partition_id}")
    if rng.random() < f.dropout_prob:
        raise SimulatedClientFailure(f"client {partition_id} dropped out in round {server_round}")
    torch.manual_seed(run.seed * 100_003 + server_round * 1009 + partition_id)
    from .methods import fed_method

    method = fed_method(run)
    budget = f.budget(partition_id)
    model = model_from_state(run, state)
    method.prepare_client(model, budget)
    check_budget(model, budget)
    device = compute_device(run)
    model.to(device)
    return model, method, budget, device, client_data(run, partition_id, num_partitions)


def local_train(run: FederatedRun, partition_id: int, num_partitions: int, state: State,
                server_round: int) -> tuple[State, dict[str, float]]:
    """Train the received model on this client's partition; returns (state, metrics)."""
    f = run.fed
    model, method, budget, device, ds = prepare_client(run, partition_id, num_partitions, state, server_round)
    loader = batches(ds, f.batch_size, shuffle=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = method.local_optimizer(params)
    sampler = nested_sampler(model, run, budget, random.Random(f"nested-{run.seed}-{server_round}-{partition_id}")) \
        if f.nested else None
    stats = train_classifier(model, loader, opt, epochs=f.local_epochs, max_steps=f.local_steps,
                             frob_decay=f.frob_decay, device=device, before_step=sampler, prox_mu=f.prox_mu,
                             autocast=lambda: autocast(run, device),  # per step: weights change between steps
                             penalty=method.penalty(model))
    return finish_client(run, partition_id, model, method, stats, len(ds), state)


def finish_client(run: FederatedRun, partition_id: int, model: nn.Module, method, stats: dict, examples: int,
                  state: State) -> tuple[State, dict[str, float]]:
    """A client's reply after training: its payload (CPU tensors) and metrics, with its fault if it has one."""
    f = run.fed
    layers = lowrank_modules(model)
    for m in layers.values():
        m.set_active_rank(None)
    metrics = {
        "train_loss": stats["loss"], "train_accuracy": stats["accuracy"], "steps": stats["steps"],
        "num-examples": float(examples), "partition_id": float(partition_id),
        "rank_sum": float(sum(m.rank for m in layers.values())),
        "rank_ratio": float(np.mean([m.rank / m.full_rank for m in layers.values()])) if layers else 1.0,
        "params": float(count_params(model)), "trainable_params": float(count_params(model, trainable_only=True)),
    }
    payload = {k: v.cpu() for k, v in method.payload(model).items()}  # the wire carries CPU tensors
    fault = f.fault_map().get(partition_id)
    bounds = value_bounds(state, f.max_abs_value, f.max_abs_ratio) if fault == "constant" else None
    return inject_fault(fault, payload, metrics, state, partition_id, bounds=bounds)


def nested_sampler(model: nn.Module, run: FederatedRun, budget: dict[str, float | int], rng: random.Random):
    """FjORD-style ordered dropout: before each local step, draw one of the configured budgets up to
    this client's own and train only the first slots that budget allows in every factorized layer,
    so every smaller budget's nested sub-model gets trained too."""
    f = run.fed
    (key, mine), = budget.items()  # rank | ratio | params
    levels = sorted({float(b) for b in (f.ranks if f.ranks is not None else f.rank_ratios) if float(b) <= mine})
    layers = list(lowrank_modules(model).values())

    def before_step(step: int) -> None:
        p = rng.choice(levels)
        for m in layers:
            k = rank_from_budget(m.full_rank, **{key: int(p) if key == "rank" else p}, dims=layer_dims(m))
            m.set_active_rank(min(k, m.rank))

    return before_step


def inject_fault(kind: str | None, update: State, metrics: dict, received: State,
                 partition_id: int, bounds: dict[str, float] | None = None) -> tuple[State, dict]:
    """Corrupt a reply on purpose (config ``fed.faults``) to exercise the server's defences:
    ``nan``/``shape`` break a factor, ``crash`` fails the job, ``scale`` sends a finite but 100x
    blown-up change (a model-replacement attack), ``budget`` returns factors of twice the rank it was sent
    (a client claiming a larger budget), ``weight`` claims 1e9 examples, ``metrics``
    drops ``train_loss`` and sends a non-number; attacks that pass every per-reply check: ``flip``/``flip1.4``/
    ``flip5`` send ``received - k·(trained - received)`` (the change reversed, k = 1, 1.4, 5), ``constant`` sets
    every value just under the server's bound for it (``bounds``, per key), ``duplicate`` is an honest reply that
    the transport delivers twice (the grid does that)."""
    if kind is None or kind == "duplicate":
        return update, metrics
    if kind == "crash":
        raise SimulatedClientFailure(f"client {partition_id} crashed (injected fault)")
    bad, meta = dict(update), dict(metrics)
    key = next((k for k in update if k.endswith(".U")), next(iter(update)))
    same = lambda k, v: k in received and v.is_floating_point() and received[k].shape == v.shape  # noqa: E731
    if kind == "nan":
        bad[key] = update[key].clone().fill_(float("nan"))
    elif kind == "shape":
        bad[key] = torch.cat([update[key], update[key][:, :1]], dim=1)
    elif kind in ("scale", "flip", "flip1.4", "flip5"):
        k = 100.0 if kind == "scale" else -float(kind[4:] or 1.0)
        bad = {n: received[n] + k * (v - received[n]) if same(n, v) else v for n, v in update.items()}
    elif kind == "constant":
        bad = {n: torch.full_like(v, 0.99 * (bounds or {}).get(n, 1e4)) if v.is_floating_point() else v
               for n, v in update.items()}
    elif kind == "budget":  # trains beyond its budget: sends every factor at twice the rank it was given
        bad = {k: (torch.cat([v, torch.randn_like(v)], dim=1) if k.endswith(".U") else
                   torch.cat([v, torch.randn_like(v)], dim=0) if k.endswith(".V") else v) for k, v in update.items()}
        meta["rank_ratio"] = 1.0
    elif kind == "weight":
        meta["num-examples"] = 1e9
    elif kind == "metrics":
        meta.pop("train_loss")
        meta["rank_ratio"] = float("inf")
    return bad, meta
