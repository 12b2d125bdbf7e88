"""What the machine can hold: the memory ``trainer.devices`` worker processes need, checked against what is
available (``MemAvailable``, and the cgroup's limit in a container) before any worker is spawned."""
from __future__ import annotations

import logging
from pathlib import Path

from fedlowrank.config import ConfigError
from fedlowrank.config.central import CentralRun

log = logging.getLogger(__name__)
WORKER_BASE_BYTES = 512 * 2**20  # a worker process with torch, its data loader and the corpus it holds
BYTES_PER_PARAM = 16  # fp32 weights, gradients and AdamW's two moments
VOCAB_BOUND = 65536  # an upper bound on the tokenizer's vocabulary for the estimate


def available_bytes() -> int | None:
    """Memory this process may still use: ``MemAvailable`` and, in a cgroup v2 container, its limit minus its
    usage (the smaller); None where neither can be read."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text().strip()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def model_params(run: CentralRun) -> int:
    """Parameters of the configured model, built on the meta device (no memory); 0 for ``model.pretrained``
    (its size is known only once loaded)."""
    if run.model.pretrained:
        return 0
    import torch

    from fedlowrank.config.zoo import IMAGE_DATA

    from .model import build_model

    with torch.device("meta"):
        model = build_model(run, None if run.data.name in IMAGE_DATA else VOCAB_BOUND)
    return sum(p.numel() for p in model.parameters())


def check_worker_memory(run: CentralRun) -> None:
    """ConfigError (before any spawn) when ``trainer.devices`` workers would need more memory than is
    available: each is estimated at :data:`WORKER_BASE_BYTES` plus :data:`BYTES_PER_PARAM` per parameter."""
    n = run.trainer.devices
    free = available_bytes()
    if n <= 1 or free is None:
        return
    per = WORKER_BASE_BYTES + BYTES_PER_PARAM * model_params(run)
    if n * per > free:
        fit = max(1, free // per)
        raise ConfigError(f"trainer.devices={n} worker processes need about {n * per / 2**30:.1f} GB "
                          f"({per / 2**30:.2f} GB each: {WORKER_BASE_BYTES / 2**30:.1f} GB per process + "
                          f"{BYTES_PER_PARAM} bytes per parameter), but {free / 2**30:.1f} GB of memory is "
                          f"available: use at most {fit}")
    log.debug("%d workers x %.2f GB estimated, %.1f GB available", n, per / 2**30, free / 2**30)
