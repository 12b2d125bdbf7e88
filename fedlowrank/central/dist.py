"""Process groups, model wrapping (DDP / FSDP2) and full-state checkpoints."""
from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_model
from torch import nn

from fedlowrank.checkpoint import latest_complete, load_tensors, point_link, prune, read_json, write_checkpoint_dir
from fedlowrank.schema import ConfigError

log = logging.getLogger(__name__)


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_dist(backend: str | None = None, device: str = "auto") -> DistEnv:
    """Join the process group described by torchrun-style env vars (RANK, WORLD_SIZE, LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device != "cpu" and torch.cuda.is_available()
    device = torch.device("cuda", local % max(1, torch.cuda.device_count())) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"), rank=rank, world_size=world,
                                device_id=device if cuda else None)
    return DistEnv(rank, world, local, device)


def wrap_model(model: nn.Module, env: DistEnv, kind: str, bf16: bool) -> nn.Module:
    """DDP (default) or FSDP2 (``fully_shard`` per block, then the root)."""
    if not env.distributed:
        return model
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(env.device.type, (env.world,))  # explicit: CPU processes on a GPU host stay on CPU
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    blocks = getattr(model, "h", None) or getattr(model, "layers", None)
    for block in blocks or []:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, kind: str, env: DistEnv):
    """(model_state, optim_state) gathered to full tensors (needed for FSDP2; plain for DDP)."""
    if env.distributed and kind == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(model, optimizer or [], options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return unwrap(model).state_dict(), (optimizer.state_dict() if optimizer is not None else {})


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, osd: dict, kind: str,
                         env: DistEnv) -> None:
    """Load a full (gathered) optimizer state into a DDP/plain or FSDP2-sharded optimizer."""
    if env.distributed and kind == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, optim_state_dict=osd,
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(osd)


def save_checkpoint(root: Path, step: int, model_state: dict, meta: dict, trainer_state: dict | None,
                    keep: int = 2) -> Path:
    """Atomically write ``root/step-<step>/`` with ``model.safetensors`` (weights), ``meta.json`` (ranks,
    step, config), ``trainer.pt`` (optimizer, RNG; tensors and plain containers only) and a verified
    manifest; then point ``root/last`` at it and keep the newest ``keep`` complete checkpoints."""

    def write(tmp: Path) -> None:
        save_model(_StateHolder(model_state), str(tmp / "model.safetensors"))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if trainer_state is not None:
            torch.save(trainer_state, tmp / "trainer.pt")

    path = write_checkpoint_dir(Path(root) / f"step-{step:09d}", write)
    point_link(Path(root) / "last", path)
    prune(root, keep)
    return path


def tied_duplicates(model: nn.Module) -> set[str]:
    """Names of parameters that are aliases of an earlier one (e.g. a tied ``lm_head.weight``)."""
    all_names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    unique = {n for n, _ in model.named_parameters()}
    return {n for n in all_names if n not in unique}


def resolve_checkpoint(path: Path | str) -> Path:
    """A checkpoint directory, or a checkpoint root whose ``last`` link points at one."""
    path = Path(path)
    if not (path / "meta.json").is_file() and (path / "last" / "meta.json").is_file():
        path = path / "last"
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (missing meta.json)")
    return path.resolve()


def resume_path(resume: str | None, root: Path) -> str | None:
    """The checkpoint ``trainer.resume`` names: a path as given, or for ``auto`` / ``auto_or_fresh`` the newest
    complete one under ``root`` (None: start fresh). ``auto`` refuses to start afresh over checkpoints that are
    all damaged; ``auto_or_fresh`` warns and does."""
    if resume not in ("auto", "auto_or_fresh"):
        return resume
    newest = latest_complete(root)
    if newest is None and root.is_dir() and any(root.glob("step-*")):
        if resume == "auto":
            raise ConfigError(f"every checkpoint under {root} is incomplete or damaged; trainer.resume=auto_or_fresh "
                              "starts the run afresh (the damaged checkpoints are left in place)")
        log.warning("every checkpoint under %s is damaged: starting afresh (trainer.resume=auto_or_fresh)", root)
    return str(newest) if newest is not None else None


def load_checkpoint_meta(path: Path) -> dict:
    return read_json(resolve_checkpoint(path) / "meta.json")


def load_weights(model: nn.Module, path: Path) -> None:
    """Load ``model.safetensors`` into an (unwrapped) model whose ranks already match."""
    f = Path(path) / "model.safetensors"
    f = f if f.is_file() else resolve_checkpoint(path) / "model.safetensors"
    tensors = load_tensors(f)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    # tied parameters are stored once (under either name): one loaded name covers the whole group
    groups: dict[int, set[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), set()).add(n)
    covered = {n for g in groups.values() if g & set(tensors) for n in g}
    really_missing = sorted(set(missing) - covered)
    if really_missing or unexpected:
        raise RuntimeError(f"checkpoint {f} does not match the model: missing={really_missing[:5]} "
                           f"unexpected={unexpected[:5]}")


class _StateHolder(nn.Module):
    """Lets safetensors' ``save_model`` (which dedups tied tensors) save a plain state dict."""

    def __init__(self, state: dict) -> None:
        super().__init__()
        self._state = {k: v.detach().cpu() for k, v in state.items()}

    def state_dict(self, *a, **k):  # type: ignore[override]
        return dict(self._state)


def broadcast_object(obj, env: DistEnv):
    """``obj`` as rank 0 has it, on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_across(x: float, env: DistEnv) -> float:
    """The mean of ``x`` over all ranks."""
    if not env.distributed:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return t.item() / env.world
