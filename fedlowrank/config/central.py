"""Typed config of central (single-node, multi-process) training: ``model`` (:class:`LMConfig`, or a zoo model,
:class:`~fedlowrank.config.zoo.ZooModelConfig`), ``data`` (:class:`TextDataConfig` or
:class:`~fedlowrank.config.zoo.ImageDataConfig`), ``trainer`` (:class:`TrainerConfig`) and the run
(:class:`CentralRun`)."""
from __future__ import annotations

import os
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedlowrank.schema import ConfigError, check_top_level, to_dataclass
from fedlowrank.methods.inrank import InRankConfig

from .zoo import IMAGE_DATA, ImageDataConfig, LowRankSwitches, ZooModelConfig, check_lowrank

LM_ARCHS = ("gpt2", "llama")
TEXT_DATA = ("pydoc", "shakespeare", "file", "textfile", "wikitext103", "c4", "tokens")


@dataclass
class LMConfig(LowRankSwitches):
    family: str = "lm"
    arch: str = "gpt2"
    size: str = "tiny"
    dropout: float = 0.0
    # low rank (LowRankSwitches): none (dense) | fixed (rank/ratio) | inrank (ranks grow; needs method=inrank)
    targets: list[str] = field(default_factory=lambda: [r"attn\.", r"mlp\."])
    skip: list[str] = field(default_factory=lambda: ["lm_head"])
    # a Hugging Face checkpoint (hub repo id or local directory): architecture and weights from it, size ignored
    pretrained: str | None = None

    def validate(self) -> None:
        if self.arch not in LM_ARCHS:
            raise ConfigError(f"model.arch must be one of {LM_ARCHS} for a family=lm model, got {self.arch!r}")
        from fedlowrank.models.gpt2 import GPT2_SIZES
        from fedlowrank.models.llama import LLAMA_SIZES

        sizes = GPT2_SIZES if self.arch == "gpt2" else LLAMA_SIZES
        if self.size not in sizes:
            raise ConfigError(f"model.size {self.size!r} is not a {self.arch} size; choose from {sorted(sizes)}")
        check_lowrank(self, ("none", "fixed", "inrank"))


@dataclass
class TextDataConfig:
    name: str = "pydoc"
    # byte | gpt2 (BPE from the HF hub) | a tokenizer.json or a directory holding one; with model.pretrained,
    # byte means the checkpoint's own tokenizer.json where it has one
    tokenizer: str = "byte"
    path: str | None = None
    train_path: str | None = None  # data=textfile: your corpus
    eval_path: str | None = None  # data=textfile: optional held-out eval file
    dir: str | None = None  # data=tokens: a directory of token shards (python -m fedlowrank.data.prepare)
    val_fraction: float = 0.1
    max_chars: int | None = None
    cache_dir: str | None = "data/cache"
    root: str = "data"
    download: bool = True
    seed: int = 0

    def validate(self) -> None:
        if self.name not in TEXT_DATA:
            raise ConfigError(f"data.name must be a text corpus {TEXT_DATA} in central mode, got {self.name!r}")
        if not 0.0 < self.val_fraction < 1.0 and not (self.name == "textfile" and self.eval_path):
            raise ConfigError(f"data.val_fraction must be in (0, 1) (the held-out eval split), got "
                              f"{self.val_fraction}")
        if self.max_chars is not None and self.max_chars < 1:
            raise ConfigError(f"data.max_chars must be >= 1 (or null), got {self.max_chars}")
        if self.name == "textfile" and not self.train_path:
            raise ConfigError("data=textfile needs data.train_path=<UTF-8 text file>")
        if self.name == "tokens":
            from fedlowrank.data.shards import read_meta

            if not self.dir or not os.path.isdir(self.dir):
                raise ConfigError(f"data=tokens needs data.dir=<directory of token shards>, got {self.dir!r}")
            read_meta(Path(self.dir))
        if self.name == "shakespeare":  # the default corpus is fetched (and verified) once where it is missing
            from fedlowrank.data.fetch import shakespeare_path

            self.path = shakespeare_path(self.path)
        for key in ("path", "train_path", "eval_path"):
            path = getattr(self, key)
            if path and not os.path.isfile(path):
                raise ConfigError(f"data.{key}={path!r} is not {'an existing file' if key == 'path' else 'a file'}")


@dataclass
class TrainerConfig:
    max_steps: int = 200
    batch_size: int = 8  # per process, per micro-batch
    grad_accum: int = 1
    block_size: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    optimizer: str = "adamw"  # adamw | sgd (with momentum and weight_decay, as the CIFAR literature trains)
    momentum: float = 0.9  # sgd
    frob_decay: float = 0.0  # Frobenius decay: + frob_decay * sum ||U V||_F^2 of the factorized layers (0: off)
    eval_interval: int = 50
    eval_iters: int = 8
    eval_full: bool = False  # evaluate on every non-overlapping window of the eval split
    log_interval: int = 10
    ckpt_interval: int = 100
    sample_every: int = 0  # at eval steps that are multiples of it, a text sample to TensorBoard (0: never)
    sample_tokens: int = 64  # tokens per sample
    devices: int = 1  # >1 without torchrun: spawn that many workers
    device: str = "auto"  # auto (CUDA if available) | cuda | cpu
    dist: str = "ddp"  # ddp | fsdp (FSDP2)
    backend: str | None = None  # default: nccl on CUDA, gloo on CPU
    precision: str = "auto"  # auto (bf16 on CUDA) | bf16 | fp32
    # a checkpoint dir; "auto": the newest complete one under <out_dir>/checkpoints (fresh when there is none; an
    # error when all are damaged); "auto_or_fresh": the same, but damaged checkpoints only warn
    resume: str | None = None
    keep_checkpoints: int = 2  # complete checkpoints kept under <out_dir>/checkpoints (step-<n>, last -> newest)
    stop_after: int | None = None  # stop (with a checkpoint) after this step, e.g. to fit a job's time limit
    progress: bool = True
    use_kernels: bool = False  # Triton fused low-rank linear on CUDA
    compile: bool = False  # torch.compile the training forward (re-compiled after each rank change)
    compile_backend: str = "inductor"  # any torch.compile backend, e.g. aot_eager (no C++ compiler needed)
    peak_tflops: float | None = None  # device peak for MFU (default: bf16 datasheet value of known GPUs)

    def validate(self) -> None:
        for k in ("max_steps", "batch_size", "grad_accum", "block_size", "eval_iters", "log_interval",
                  "eval_interval", "ckpt_interval", "devices", "keep_checkpoints", "sample_tokens"):
            if getattr(self, k) < 1:
                raise ConfigError(f"trainer.{k} must be >= 1, got {getattr(self, k)}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0:
            raise ConfigError("trainer.lr must be > 0, min_lr_ratio in [0, 1], warmup_steps >= 0")
        if self.optimizer not in ("adamw", "sgd") or not 0 <= self.momentum < 1 or self.frob_decay < 0:
            raise ConfigError(f"trainer.optimizer must be adamw|sgd, trainer.momentum in [0, 1) and trainer.frob_decay "
                              f">= 0, got {self.optimizer!r}, {self.momentum}, {self.frob_decay}")
        if self.stop_after is not None and self.stop_after < 1:
            raise ConfigError(f"trainer.stop_after must be >= 1 (or null), got {self.stop_after}")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ConfigError(f"trainer.peak_tflops must be > 0 (or null), got {self.peak_tflops}")
        if self.compile:
            import torch._dynamo

            if self.compile_backend not in torch._dynamo.list_backends(exclude_tags=()):
                raise ConfigError(f"trainer.compile_backend {self.compile_backend!r} is not a torch.compile backend: "
                                  f"{torch._dynamo.list_backends(exclude_tags=())}")
        if self.dist not in ("ddp", "fsdp"):
            raise ConfigError(f"trainer.dist must be ddp or fsdp, got {self.dist!r}")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ConfigError(f"trainer.device must be auto|cuda|cpu, got {self.device!r}")
        import torch

        cuda = self.device != "cpu" and torch.cuda.is_available()
        if self.device == "cuda" and not cuda:
            raise ConfigError("trainer.device=cuda but no CUDA device is available")
        if cuda and self.devices > torch.cuda.device_count():
            raise ConfigError(f"trainer.devices={self.devices} but only {torch.cuda.device_count()} GPU(s) are "
                              "visible (one process per GPU); use trainer.device=cpu for CPU processes")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if not cuda and self.devices > cores:
            raise ConfigError(f"trainer.devices={self.devices} CPU processes, but this machine gives the run "
                              f"{cores} core(s): use at most {cores}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"trainer.precision must be auto|bf16|fp32, got {self.precision!r}")


@dataclass
class CentralRun:
    model: LMConfig | ZooModelConfig
    data: TextDataConfig | ImageDataConfig
    trainer: TrainerConfig
    method: dict[str, Any]
    out_dir: str
    seed: int = 0

    def inrank(self) -> InRankConfig | None:
        return to_dataclass(InRankConfig, self.method, "method") if self.method.get("name") == "inrank" else None

    def validate(self) -> None:
        """Each section validates itself; then the checkpoints named, the method and what crosses sections."""
        self.trainer.validate()
        if isinstance(self.model, ZooModelConfig):
            self.model.validate(self.data.name, self.trainer.block_size)
            self._validate_zoo()
        else:
            self.model.validate()
            if isinstance(self.data, ImageDataConfig):
                raise ConfigError(f"data={self.data.name} holds images: train a vision model on it (e.g. model=cnn, "
                                  f"model=resnet18); model={self.model.arch} is a language model")
        self.data.validate()
        if self.trainer.frob_decay > 0 and (self.trainer.dist == "fsdp" or self.model.lowrank == "none"):
            raise ConfigError("trainer.frob_decay acts on factorized layers: it needs model.lowrank=fixed|inrank and "
                              "trainer.dist=ddp")
        self._check_paths()
        if self.model.pretrained:
            self._check_pretrained()
        name = self.method.get("name", "none")
        if name not in ("none", "inrank", "relora", "welore"):
            raise ConfigError(f"unknown method {name!r} (none|inrank|relora|welore)")
        if name in ("relora", "welore"):
            self._validate_dense_method(name)
        if (name == "inrank") != (self.model.lowrank == "inrank"):
            raise ConfigError("method=inrank and model.lowrank=inrank go together")
        if name == "inrank":
            try:
                ir = self.inrank()
                ir.validate()  # type: ignore[union-attr]
            except (TypeError, ValueError) as e:
                raise ConfigError(str(e)) from e
            if self.trainer.dist == "fsdp" and ir.stage == 1:  # type: ignore[union-attr]
                raise ConfigError("InRank stage 1 changes parameter shapes, which FSDP2 sharding does not allow; "
                                  "use trainer.dist=ddp for stage 1 (stage 2 works with fsdp)")

    def _validate_zoo(self) -> None:
        """Zoo models train from scratch, dense or at a fixed rank, replicated (DDP)."""
        if self.method.get("name", "none") != "none":
            raise ConfigError(f"method={self.method.get('name')} acts on the language models (model=gpt2|llama); "
                              f"model.family={self.model.family} trains with method=none")
        if self.trainer.dist == "fsdp":
            raise ConfigError("trainer.dist=fsdp shards the language models' blocks; zoo models use trainer.dist=ddp")

    def _check_paths(self) -> None:
        """Checkpoint and data paths named in the config exist (before any process starts)."""
        auto = self.trainer.resume in ("auto", "auto_or_fresh")
        checks = [("trainer.resume", None if auto else self.trainer.resume, "dir"),
                  ("method.from_ckpt", self.method.get("from_ckpt"), "dir"),
                  ("method.stage1_ckpt", self.method.get("stage1_ckpt"), "dir")]
        for key, path, kind in checks:
            if path and not (os.path.isdir(path) if kind == "dir" else os.path.isfile(path)):
                raise ConfigError(f"{key}={path!r} is not an existing {'directory' if kind == 'dir' else 'file'}")

    def _check_pretrained(self) -> None:
        """``model.pretrained`` names a checkpoint of ``model.arch`` that this project can represent, with
        safetensors weights and a context of at least ``trainer.block_size`` (nothing is loaded yet)."""
        from fedlowrank.models import hf

        d = hf.resolve(str(self.model.pretrained))
        arch, mc = hf.model_config(d)
        if arch != self.model.arch:
            raise ConfigError(f"model.pretrained={self.model.pretrained!r} is a {arch} checkpoint; use model={arch}")
        hf.check_tensors(d, arch, mc)  # headers only: names, shapes and dtypes against config.json
        if self.trainer.block_size > mc.block_size:
            raise ConfigError(f"trainer.block_size={self.trainer.block_size} exceeds the checkpoint's context "
                              f"({mc.block_size} positions)")

    def tokenizer(self) -> str:
        """``data.tokenizer``; the shards' own with ``data=tokens``; with ``model.pretrained`` and
        ``data.tokenizer=byte``, the checkpoint's ``tokenizer.json`` (its directory) where it has one."""
        if self.data.name == "tokens":
            from fedlowrank.data.shards import read_meta

            tok = read_meta(Path(str(self.data.dir)))["tokenizer"]
            return tok if tok == "byte" else str(Path(str(self.data.dir)) / tok)
        if self.model.pretrained and self.data.tokenizer == "byte":
            from fedlowrank.models.hf import resolve

            d = resolve(str(self.model.pretrained))
            if (d / "tokenizer.json").is_file():
                return str(d)
        return self.data.tokenizer

    def _validate_dense_method(self, name: str) -> None:
        """ReLoRA and WeLore act on dense models; FSDP2 allows no restructuring after sharding."""
        from fedlowrank.methods.relora import ReLoRAConfig
        from fedlowrank.methods.welore import WeLoreConfig

        if self.model.lowrank != "none":
            raise ConfigError(f"method={name} works on a dense model: set model.lowrank=none")
        cls = ReLoRAConfig if name == "relora" else WeLoreConfig
        try:
            mc = to_dataclass(cls, self.method, "method")
            mc = mc.for_steps(self.trainer.max_steps) if isinstance(mc, ReLoRAConfig) else mc
            mc.validate()
        except (TypeError, ValueError) as e:
            raise ConfigError(str(e)) from e
        if name == "welore" and mc.pretrain_steps == 0 and not (mc.from_ckpt or self.model.pretrained):  # type: ignore
            raise ConfigError("method=welore with method.pretrain_steps=0 compresses the model it starts from: give "
                              "one with model.pretrained=<hub id or directory> or method.from_ckpt=<checkpoint>")
        if self.trainer.dist == "fsdp":
            if name == "relora" and mc.warm_start_steps > 0:  # type: ignore[union-attr]
                raise ConfigError("ReLoRA's full-rank warm start attaches adapters mid-run, which FSDP2 sharding "
                                  "does not allow: use trainer.dist=ddp or method.warm_start_steps=0")
            if name == "welore" and mc.pretrain_steps > 0:  # type: ignore[union-attr]
                raise ConfigError("WeLore replaces layers after pretraining, which FSDP2 sharding does not allow: "
                                  "use trainer.dist=ddp, or method.from_ckpt with method.pretrain_steps=0")


def central_run_from_cfg(cfg: DictConfig | dict) -> CentralRun:
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    check_top_level(cfg, {"seed", "out_dir", "model", "data", "strategy", "method", "trainer", "run_mode"}, "central")
    name = (cfg.get("data") or {}).get("name", "pydoc")
    if name not in TEXT_DATA + IMAGE_DATA:  # before the key check: another dataset's keys would hide the mistake
        raise ConfigError(f"data.name must be a text corpus {TEXT_DATA} or an image dataset {IMAGE_DATA} in central "
                          f"mode, got {name!r}")
    model_node = OmegaConf.to_container(cfg.get("model") or {}, resolve=True)
    lm = model_node.get("family", "lm") == "lm"  # type: ignore[union-attr]
    run = CentralRun(
        model=to_dataclass(LMConfig, model_node, "model") if lm else ZooModelConfig.from_node(model_node),  # type: ignore
        data=to_dataclass(TextDataConfig if name in TEXT_DATA else ImageDataConfig, cfg.get("data", {}), "data"),
        trainer=to_dataclass(TrainerConfig, cfg.get("trainer", {}), "trainer"),
        method=OmegaConf.to_container(cfg.get("method", {}) or {}, resolve=True),  # type: ignore[arg-type]
        out_dir=str(cfg.get("out_dir") or os.path.join("outputs", "central")),
        seed=int(cfg.get("seed", 0)),
    )
    run.validate()
    return run
