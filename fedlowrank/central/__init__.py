"""Central mode: single-node (multi-process) training of language models and of the model zoo (image
classifiers, character LSTM/Transformer). ``run(cfg)`` is the Hydra entry."""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from omegaconf import DictConfig

from fedlowrank.config.central import CentralRun, central_run_from_cfg
from fedlowrank.schema import ConfigError

log = logging.getLogger(__name__)


def _spawned(local_rank: int, run: CentralRun, port: int, world: int) -> None:
    import torch

    logging.basicConfig(level=logging.INFO if local_rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s][rank{local_rank}][%(name)s][%(levelname)s] - %(message)s")
    os.environ.update(RANK=str(local_rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if run.trainer.device == "cpu" or not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    train(run)


def train(run: CentralRun) -> dict:
    """Entry point of one process (plain, torchrun, or spawned)."""
    import torch.distributed as dist

    from .dist import init_dist
    from .trainer import Trainer

    env = init_dist(run.trainer.backend, run.trainer.device)
    try:
        summary = Trainer(run, env, load_data(run, env.is_main)).fit()
        if env.distributed:
            dist.barrier()  # every rank leaves its last collective before rank 0 (the store host) tears down
        return summary
    finally:
        if env.distributed and dist.is_initialized():
            dist.destroy_process_group()


def load_data(run: CentralRun, main_process: bool = True):
    """The run's data: an image set (:class:`~fedlowrank.data.vision.ImageData`) or token streams
    (:class:`~fedlowrank.data.text.TextData`, its tokenizer kept in the run directory by the main process)."""
    from fedlowrank.config.zoo import ImageDataConfig
    from fedlowrank.data.text import check_splits, load_text_data

    d = run.data
    if isinstance(d, ImageDataConfig):
        from fedlowrank.data.vision import load_digits_data, load_image_data

        if d.name == "digits":
            return load_digits_data(d.test_fraction, d.seed)
        try:
            return load_image_data(d.name, d.root, d.download, d.seed)
        except RuntimeError as e:  # offline and not on disk: a clear error, before any training
            raise ConfigError(str(e)) from None
    tokenizer = run.tokenizer()
    data = load_text_data(d.name, tokenizer, d.dir if d.name == "tokens" else d.path, d.val_fraction,
                          d.max_chars, d.cache_dir, train_path=d.train_path, eval_path=d.eval_path)
    if main_process:
        keep_tokenizer(tokenizer, Path(run.out_dir))
    check_splits(data, run.trainer.block_size, f"data={d.name}" + (f" ({d.train_path})" if d.train_path else ""))
    return data


def keep_tokenizer(tokenizer: str, out: Path) -> None:
    """Copy a tokenizer given as a file or directory into ``<out>/tokenizer/`` (export writes it beside the
    weights); named tokenizers (byte, hub names) need nothing."""
    from fedlowrank.models.hf import TOKENIZER_FILES

    src = Path(tokenizer).expanduser()
    files = [src] if src.is_file() else [src / n for n in TOKENIZER_FILES if (src / n).is_file()]
    if not files:
        return
    (out / "tokenizer").mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copyfile(f, out / "tokenizer" / ("tokenizer.json" if f == src else f.name))


def launch(run: CentralRun) -> dict:
    """Run in this process (plain or under torchrun), or spawn ``trainer.devices`` workers."""
    os.makedirs(run.out_dir, exist_ok=True)
    if run.trainer.devices > 1 and "RANK" not in os.environ:
        import torch.multiprocessing as mp

        from .dist import free_port
        from .resources import check_worker_memory

        check_worker_memory(run)  # before any worker exists

        log.info("spawning %d workers", run.trainer.devices)
        try:
            mp.spawn(_spawned, args=(run, free_port(), run.trainer.devices), nprocs=run.trainer.devices, join=True)
        except mp.ProcessRaisedException as e:  # a worker's config error (e.g. a split too short) stays one
            lines = [ln for ln in str(e).splitlines() if "ConfigError: " in ln]
            if lines:
                raise ConfigError(lines[-1].split("ConfigError: ", 1)[1]) from None
            raise
        return json.loads((Path(run.out_dir) / "summary.json").read_text())
    return train(run)


def summary_lines(summary: dict, out_dir: str, wall_s: float) -> list[str]:
    """The closing lines of a central run: held-out loss (ppl, accuracy), parameters against the dense model, size
    and forward FLOPs, final ranks, wall time, whole-run throughput, and where ``summary.json`` and the
    TensorBoard logs are."""
    ev = summary.get("final_eval") or {}
    comp = summary.get("compression") or {}
    lines = [f"central run finished at step {summary.get('step')} in {wall_s:.1f} s wall"]
    if ev:
        extra = "".join(f", {k} {ev[k]:.4f}" for k in ("ppl", "accuracy") if k in ev)
        lines.append(f"  held-out loss {ev['loss']:.4f}{extra} (step {ev['step']})")
    params, dense = summary.get("params", 0), comp.get("params_if_dense") or summary.get("params", 0)
    adapters = f", LoRA adapters {comp['adapter_params']:,} of them" if comp.get("adapter_params") else ""
    lines.append(f"  parameters {params:,} stored ({params / max(1, dense):.3f}x the dense model's {dense:,}{adapters}); "
                 f"trainable {summary.get('trainable_params', 0):,}")
    ranks = summary.get("ranks") or {}
    if ranks:
        shown = ", ".join(f"{k} {v}" for k, v in list(ranks.items())[:6])
        lines.append(f"  final ranks ({len(ranks)} layers): {shown}{', ...' if len(ranks) > 6 else ''}")
    if "size_mb" in summary:
        lines.append(f"  size {summary['size_mb']:.3f} MB, forward {summary.get('forward_flops', 0) / 1e6:.3f} MFLOPs "
                     f"per {'image' if summary.get('unit') == 'samples' else 'sequence'}")
    u = summary.get("unit", "tokens")
    lines.append(f"  throughput {summary.get(f'{u}_per_s', 0):,.0f} {u}/s over the whole run "
                 f"({summary.get(f'{u}_seen', 0):,} {u})")
    out = os.path.abspath(out_dir)
    lines.append(f"  summary: {os.path.join(out, 'summary.json')}")
    lines.append(f"  tensorboard --logdir {out}")
    return lines


def run(cfg: DictConfig) -> dict:
    """Validate the config (errors before any training), then train; logs where the output goes at the start
    and a short summary at the end."""
    cr = central_run_from_cfg(cfg)
    what = f"{cr.model.arch} ({cr.model.family})" if cr.model.size == "zoo" else f"{cr.model.arch} {cr.model.size}"
    log.info("central run: %s, lowrank=%s, method=%s, data=%s, %d steps; output in %s", what, cr.model.lowrank,
             cr.method.get("name", "none"), cr.data.name, cr.trainer.max_steps,
             os.path.abspath(cr.out_dir))
    t0 = time.time()
    summary = launch(cr)
    if int(os.environ.get("RANK", "0")) == 0:
        for line in summary_lines(summary, cr.out_dir, time.time() - t0):
            log.info("%s", line)
    return summary


__all__ = ["CentralRun", "central_run_from_cfg", "launch", "load_data", "run", "summary_lines", "train"]
