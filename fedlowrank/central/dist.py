"""Process groups, model wrapping (DDP / FSDP2) and full-state checkpoints."""
from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_model, save_model
from torch import nn


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


def save_checkpoint(path: Path, model_state: dict, meta: dict, trainer_state: dict | None) -> None:
    """``model.safetensors`` (weights), ``meta.json`` (ranks, step, config), ``trainer.pt`` (optimizer, RNG)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    holder = _StateHolder(model_state)
    save_model(holder, str(tmp / "model.safetensors"))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    if trainer_state is not None:
        torch.save(trainer_state, tmp / "trainer.pt")
    if path.exists():
        import shutil

        shutil.rmtree(path)
    tmp.rename(path)  # atomic-ish: a crash mid-save never leaves a half checkpoint at ``path``


def tied_duplicates(model: nn.Module) -> set[str]:
    """Names of parameters that are aliases of an earlier one (e.g. a tied ``lm_head.weight``)."""
    all_names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    unique = {n for n, _ in model.named_parameters()}
    return {n for n in all_names if n not in unique}


def load_checkpoint_meta(path: Path) -> dict:
    f = Path(path) / "meta.json"
    if not f.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (missing meta.json)")
    return json.loads(f.read_text())


def load_weights(model: nn.Module, path: Path) -> None:
    """Load ``model.safetensors`` into an (unwrapped) model whose ranks already match."""
    missing, unexpected = load_model(model, str(Path(path) / "model.safetensors"), strict=False)
    tied = tied_duplicates(model)
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"checkpoint mismatch: missing={sorted(set(missing) - tied)[:5]} unexpected={unexpected[:5]}")


class _StateHolder(nn.Module):
    """Lets safetensors' ``save_model`` (which dedups tied tensors) save a plain state dict."""

    def __init__(self, state: dict) -> None:
        super().__init__()
        self._state = {k: v.detach().cpu() for k, v in state.items()}

    def state_dict(self, *a, **k):  # type: ignore[override]
        return dict(self._state)
