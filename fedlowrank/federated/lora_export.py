"""A federated LoRA run (``method=lora``) as one dense model: the pretrained base with the run's global adapter
merged into every adapted weight, for :mod:`fedlowrank.export`."""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf
from torch import nn

from fedlowrank.checkpoint import load_tensors
from fedlowrank.config import ConfigError, federated_run_from_cfg
from fedlowrank.lowrank.factorize import set_submodule
from fedlowrank.lowrank.lora import LoRALinear
from fedlowrank.models.hf import PretrainedError, resolve

from .lora import lora_model
from .methods import fed_method


def is_lora_run(d: Path) -> bool:
    """Whether ``d`` is the output directory of a federated ``method=lora`` run."""
    cfg = d / ".hydra" / "config.yaml"
    if not cfg.is_file() or not (d / "checkpoints" / "last.safetensors").is_file():
        return False
    node = OmegaConf.load(cfg)
    return node.get("run_mode") == "federated" and (node.get("method") or {}).get("name") == "lora"


def merged_lora_run(d: Path) -> tuple[nn.Module, int, Path]:
    """(the base with the global adapter merged, adapter parameters stored, the checkpoint's directory for its
    tokenizer files). The run's config is validated again (its checkpoint must still be there), and the stored
    adapters must have the keys and layer shapes the run's method starts from."""
    node = OmegaConf.load(d / ".hydra" / "config.yaml")
    node.out_dir = str(d)
    try:
        run = federated_run_from_cfg(node)
    except ConfigError as e:
        raise PretrainedError(f"{d}: its config no longer validates ({e})") from None
    state = load_tensors(d / "checkpoints" / "last.safetensors")
    start = fed_method(run).initial_state()
    bad = sorted(set(state) ^ set(start)) or [k for k in start if state[k].dim() != 2 or (
        state[k].shape[0] != start[k].shape[0] if k.endswith(".U") else state[k].shape[1] != start[k].shape[1])]
    if bad:
        raise PretrainedError(f"{d}/checkpoints/last.safetensors does not hold this run's adapters ({bad[0]!r})")
    model = lora_model(run, state)
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]:
        set_submodule(model, name, m.merged_linear())
    return model, sum(v.numel() for v in state.values()), resolve(str(run.model["pretrained"]))
