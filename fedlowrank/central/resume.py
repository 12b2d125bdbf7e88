"""Resuming a central run: every field of a checkpoint's ``meta.json`` and ``trainer.pt`` is type- and
range-checked against the run's config and model before it is used (the step within [0, ``trainer.max_steps``],
finite counters, ranks of existing factorized layers within [1, full rank], weights of exactly the model's names
and shapes read from the safetensors header, one CPU RNG state per process, optimizer moments of their
parameters' shapes). A bad field is a :class:`CheckpointError` naming the file and the field."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from fedlowrank.checkpoint import CheckpointError, checked_int, checked_number
from fedlowrank.lowrank.factorize import lowrank_modules
from fedlowrank.tensorfile import TensorFileError, check_against

if TYPE_CHECKING:
    from .trainer import Trainer

log = logging.getLogger(__name__)


def check_meta(meta: object, path: Path, max_steps: int, unit: str) -> dict:
    """``meta.json``'s step, counters, loss and eval history, ranks and method state, typed and in range."""
    if not isinstance(meta, dict) or {"step", "ranks"} - set(meta):
        raise CheckpointError(f"{path}: not a checkpoint's meta (needs step and ranks)")
    checked_int(meta["step"], 0, max_steps, f"{path}: step")
    checked_int(meta.get(f"{unit}_seen", 0), 0, math.inf, f"{path}: {unit}_seen")
    for key in ("model_flops", "train_time_s"):
        checked_number(meta.get(key, 0.0), f"{path}: {key}", minimum=0)
    losses = meta.get("losses", [])
    if not isinstance(losses, list) or not all(isinstance(x, list) and len(x) == 2 and type(x[0]) is int and
                                               type(x[1]) in (int, float) for x in losses):
        raise CheckpointError(f"{path}: losses must be a list of [step, loss] pairs")
    evals = meta.get("evals", [])
    if not isinstance(evals, list) or not all(isinstance(e, dict) and all(type(v) in (int, float)
                                                                         for v in e.values()) for e in evals):
        raise CheckpointError(f"{path}: evals must be a list of objects of numbers")
    if not isinstance(meta["ranks"], dict) or not isinstance(meta.get("method_state", {}), dict):
        raise CheckpointError(f"{path}: ranks and method_state must be objects")
    return meta


def check_ranks(model: nn.Module, ranks: dict, where: str) -> None:
    """Every named layer is a factorized layer of the model and its rank is in [1, its full rank]."""
    mods = lowrank_modules(model)
    for name, r in ranks.items():
        if name not in mods:
            raise CheckpointError(f"{where}: {str(name)[:60]!r} is not a factorized layer of this run's model")
        checked_int(r, 1, mods[name].full_rank, f"{where}[{name!r}]")


def check_weights(model: nn.Module, path: Path) -> None:
    """The safetensors file holds the model's own names, shapes and dtypes (tied aliases may be stored once),
    from its header, before anything is loaded."""
    try:
        check_against(path, model.state_dict(keep_vars=True), require_all=False)
    except TensorFileError as e:
        raise CheckpointError(str(e)) from None


def check_trainer_state(ts: object, path: Path, world: int) -> dict:
    """``trainer.pt``: an optimizer state dict and one RNG state per process (a CPU generator state)."""
    if not isinstance(ts, dict) or not isinstance(ts.get("optimizer"), dict) or not isinstance(ts.get("rng"), list):
        raise CheckpointError(f"{path}: expected {{optimizer, rng, step}}")
    osd = ts["optimizer"]
    if not isinstance(osd.get("state"), dict) or not isinstance(osd.get("param_groups"), list):
        raise CheckpointError(f"{path}: optimizer must hold state and param_groups")
    if len(ts["rng"]) != world:
        raise CheckpointError(f"{path}: rng holds {len(ts['rng'])} process states; this run has {world}")
    n = torch.get_rng_state().numel()
    for i, st in enumerate(ts["rng"]):
        cpu = st.get("cpu") if isinstance(st, dict) else None
        if not isinstance(cpu, torch.Tensor) or cpu.dtype != torch.uint8 or cpu.numel() != n:
            raise CheckpointError(f"{path}: rng[{i}].cpu is not a CPU generator state ({n} bytes)")
        cuda = st.get("cuda")
        if cuda is not None and (not isinstance(cuda, torch.Tensor) or cuda.dtype != torch.uint8):
            raise CheckpointError(f"{path}: rng[{i}].cuda is not a CUDA generator state")
    return ts


def check_optimizer_loaded(opt: torch.optim.Optimizer, path: Path) -> None:
    """After loading: every moment has its parameter's shape (a planted one would fail at the first step)."""
    for group in opt.param_groups:
        for p in group["params"]:
            for k, v in opt.state.get(p, {}).items():
                if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != p.shape:
                    raise CheckpointError(f"{path}: optimizer state {k!r} has shape {list(v.shape)} for a "
                                          f"parameter of shape {list(p.shape)}")


def restore(tr: "Trainer", path: Path) -> dict:
    """Restore structure (method state, ranks), weights and counters from the checkpoint at ``path`` into the
    trainer's unwrapped model, each field checked first; returns the checked trainer state (optimizer, RNG)."""
    from fedlowrank.checkpoint import is_complete, load_torch_state
    from fedlowrank.lowrank import set_ranks

    from .dist import load_checkpoint_meta, load_weights, resolve_checkpoint

    path = resolve_checkpoint(path)
    if not is_complete(path):
        log.warning("resuming from %s, which has no manifest matching its files (incomplete or altered)", path)
    meta = check_meta(load_checkpoint_meta(path), path / "meta.json", tr.t.max_steps, tr.unit)
    try:
        tr.hook.restore(tr, meta.get("method_state", {}))
    except CheckpointError as e:
        raise CheckpointError(f"{path / 'meta.json'}: {e}") from None
    check_ranks(tr.model, meta["ranks"], f"{path / 'meta.json'}: ranks")
    set_ranks(tr.model, meta["ranks"])
    check_weights(tr.model, path / "model.safetensors")
    ts = check_trainer_state(load_torch_state(path / "trainer.pt"), path / "trainer.pt", tr.env.world)
    load_weights(tr.model, path)
    tr.step = meta["step"]
    tr.losses = [tuple(x) for x in meta.get("losses", [])]  # type: ignore[misc]
    tr.evals = meta.get("evals", [])
    tr.units_seen = meta.get(f"{tr.unit}_seen", 0)
    tr.model_flops = float(meta.get("model_flops", 0.0))
    tr.train_time = float(meta.get("train_time_s", 0.0))
    log.info("resumed from %s at step %d", path, tr.step)
    return ts


def set_aside(tr: "Trainer", err: CheckpointError, path: Path) -> None:
    """``trainer.resume=auto_or_fresh`` over a refused checkpoint: say so, rename it ``rejected-<name>`` (kept,
    never picked again) and zero the counters a restore may have set; the caller rebuilds the model."""
    log.warning("trainer.resume=auto_or_fresh: %s; starting afresh (the checkpoint is set aside as "
                "rejected-%s)", err, path.name)
    tr.barrier()  # every process has read the checkpoint before it moves
    if tr.env.is_main:
        path.rename(path.with_name(f"rejected-{path.name}"))
    tr.barrier()
    tr.step, tr.losses, tr.evals, tr.units_seen, tr.train_time, tr.model_flops = 0, [], [], 0, 0.0, 0.0
