"""Central mode: single-node (multi-process) LM pretraining. ``run(cfg)`` is the Hydra entry."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from omegaconf import DictConfig

from .config import CentralRun, central_run_from_cfg

log = logging.getLogger(__name__)


def _spawned(local_rank: int, run: CentralRun, port: int, world: int) -> None:
    import torch

    logging.basicConfig(level=logging.INFO if local_rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s][rank{local_rank}][%(name)s][%(levelname)s] - %(message)s")
    os.environ.update(RANK=str(local_rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if run.trainer.device == "cpu" or not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    from .trainer import train

    train(run)


def launch(run: CentralRun) -> dict:
    """Run in this process (plain or under torchrun), or spawn ``trainer.devices`` workers."""
    os.makedirs(run.out_dir, exist_ok=True)
    if run.trainer.devices > 1 and "RANK" not in os.environ:
        import torch.multiprocessing as mp

        from .dist import free_port

        log.info("spawning %d workers", run.trainer.devices)
        mp.spawn(_spawned, args=(run, free_port(), run.trainer.devices), nprocs=run.trainer.devices, join=True)
        return json.loads((Path(run.out_dir) / "summary.json").read_text())
    from .trainer import train

    return train(run)


def run(cfg: DictConfig) -> dict:
    """Validate the config (errors before any training), then train."""
    return launch(central_run_from_cfg(cfg))


__all__ = ["CentralRun", "central_run_from_cfg", "launch", "run"]
