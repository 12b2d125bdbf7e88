"""The central training loop for every task (language models, image classifiers, character models): DDP/FSDP2,
grad accumulation, cosine LR, bf16 autocast, held-out evaluation, exact resume, TensorBoard, the method hooks
(InRank stage 1 → compressed checkpoint → stage 2, ReLoRA, WeLore). What is trained on comes from a task
(:mod:`fedlowrank.central.task`)."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from fedlowrank import stopping as stop
from fedlowrank.checkpoint import CheckpointError
from fedlowrank.config.central import CentralRun, LMConfig
from fedlowrank.data.text import TextData
from fedlowrank.data.vision import ImageData
from fedlowrank.lowrank import compression_summary, count_params, frobenius_decay, model_ranks, size_mb
from fedlowrank.training.optim import remap_optimizer_state

from .guard import NonFiniteGuard
from .hooks import make_hook
from .sample import tb_sample
from .model import build_model
from .resume import check_optimizer_loaded, restore, set_aside
from .task import forward_flops, make_task
from .throughput import device_peak_flops, mfu
from .dist import (DistEnv, broadcast_object, full_state, load_optimizer_state, mean_across, resume_path,
                   save_checkpoint, tied_duplicates, wrap_model)

log = logging.getLogger(__name__)


@dataclass
class _Pace:
    """Throughput bookkeeping of :meth:`Trainer.fit`: the last log point (time, step, units/s) and the
    training time not yet banked (since ``loop_start``, minus ``side``: eval and checkpoint time)."""

    s0: int
    t0: float = field(default_factory=time.perf_counter)
    tps: float = 0.0
    loop_start: float = field(default_factory=time.perf_counter)
    side: float = 0.0


class Trainer:
    def __init__(self, run: CentralRun, env: DistEnv, data: TextData | ImageData) -> None:
        self.run, self.env, self.data, self.t = run, env, data, run.trainer
        self.task = make_task(run, env.world, data)
        self.unit = self.task.unit  # tokens | samples: what throughput counts
        self.out = Path(run.out_dir)
        self.bf16 = env.device.type == "cuda" and self.t.precision in ("auto", "bf16")
        self.step = 0
        self.units_seen, self.train_time = 0, 0.0  # whole-run throughput, carried across resume
        self.model_flops, self.flops_per_unit = 0.0, 0.0  # counted FLOPs of the whole run / of one unit now
        self.guard = NonFiniteGuard(self.out / "checkpoints")
        self.losses: list[tuple[int, float]] = []
        self.evals: list[dict] = []
        self.writer = None
        self.compiles = 0  # torch.compile wrappers built (one per structural change)
        self.graph_compile_steps: list[int] = []  # step at each graph the backend really compiled
        self._build()
        path = resume_path(self.t.resume, self.out / "checkpoints")
        try:
            self._start(restore(self, Path(path)) if path else None, path)
        except CheckpointError as e:  # planted or damaged state, named; nothing trained from it
            if self.t.resume != "auto_or_fresh":
                raise
            set_aside(self, e, Path(path))  # type: ignore[arg-type]
            self._build()
            self._start(None, None)

    def _build(self) -> None:
        """The run's model (identical init on every process) and its method hook."""
        torch.manual_seed(self.run.seed)
        self.model = build_model(self.run, self.task.vocab_size)
        self.hook = make_hook(self.run.method, self.run.seed, self.run.trainer.max_steps)

    def _start(self, trainer_state: dict | None, path: str | None) -> None:
        """Method setup (fresh) or the checked optimizer and RNG state (resumed), then wrap and place."""
        if trainer_state is None:
            self.hook.setup(self)
        self.model.to(self.env.device)
        self._wrap()
        if trainer_state is not None:
            try:
                load_optimizer_state(self.wrapped, self.opt, trainer_state["optimizer"], self.t.dist, self.env)
            except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
                raise CheckpointError(f"{Path(path) / 'trainer.pt'}: optimizer state does not fit this run's "  # type: ignore
                                      f"optimizer ({type(e).__name__}: {str(e)[:120]})") from None
            check_optimizer_loaded(self.opt, Path(path) / "trainer.pt")  # type: ignore[arg-type]
            self._set_rng(trainer_state["rng"][self.env.rank])
        else:
            torch.manual_seed(self.run.seed * 1000 + self.env.rank)  # dropout stream per process

    # ------------------------------------------------------------------ setup helpers
    def _wrap(self) -> None:
        if self.t.use_kernels and self.env.device.type == "cuda":
            from fedlowrank.kernels import enable_kernels

            enable_kernels(self.model)
        self.wrapped = wrap_model(self.model, self.env, self.t.dist, self.bf16)
        self._compile()
        self.flops_per_unit = self.task.flops_per_unit(self.model, self.env.device)
        groups, t = self.hook.param_groups(self), self.t
        if t.optimizer == "sgd":
            self.opt = torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum)
        else:
            self.opt = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2),
                                         fused=self.env.device.type == "cuda")

    def rebuild(self) -> None:
        """After a structural change (adapters attached, layers replaced, params frozen):
        move new modules to the device, re-wrap and start a fresh optimizer over trainable params."""
        self.model.to(self.env.device)
        self._wrap()

    def broadcast(self, obj):
        return broadcast_object(obj, self.env)

    def apply_rank_change(self, change) -> None:
        """Run ``change(model)`` (which replaces factor Parameters), then remap optimizer state
        and re-wrap DDP so it tracks the new parameters."""
        old = dict(self.model.named_parameters())
        reset = change(self.model)
        new = dict(self.model.named_parameters())
        mapping = {old[n]: new[n] for n in new if n in old and old[n] is not new[n]}
        remap_optimizer_state(self.opt, mapping, reset={old[n] for n in (reset or set()) if n in old})
        self.wrapped = wrap_model(self.model, self.env, self.t.dist, self.bf16)
        self._compile()
        self.flops_per_unit = self.task.flops_per_unit(self.model, self.env.device)

    def _compile(self) -> None:
        """``self.forward``: the wrapped model, compiled with ``trainer.compile``. Dynamo guards on
        parameter shapes, so a graph is compiled again only when a rank change altered a shape (then
        with dynamic sizes, so later rank changes reuse it); every graph the backend compiles is
        recorded in ``self.graph_compile_steps``."""
        self.forward: nn.Module = self.wrapped
        if self.t.compile:
            import torch._dynamo

            inner = torch._dynamo.lookup_backend(self.t.compile_backend)

            def counted(gm, example_inputs):
                self.graph_compile_steps.append(self.step)
                return inner(gm, example_inputs)

            # the default limit (8) would silently fall back to eager after a few InRank rank changes
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self.forward = torch.compile(self.wrapped, backend=counted)  # type: ignore[assignment]
            self.compiles += 1

    # ------------------------------------------------------------------ loop
    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def _loss(self, x: torch.Tensor, y: torch.Tensor, model: nn.Module) -> torch.Tensor:
        with self.autocast():
            logits = model(x)
        return self.task.loss(logits, y)

    def train_step(self) -> float:
        t, env = self.t, self.env
        lr = self.hook.lr(self, self.step)
        for g in self.opt.param_groups:
            g["lr"] = lr
        total = 0.0
        for micro in range(t.grad_accum):
            x, y = self.task.batch(self.step, env.rank, micro)
            x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
            sync = micro == t.grad_accum - 1 or not (env.distributed and t.dist == "ddp")
            ctx = contextlib.nullcontext() if sync else self.wrapped.no_sync()  # type: ignore[operator]
            with ctx:
                loss = self._loss(x, y, self.forward) / t.grad_accum
                obj = loss + t.frob_decay / t.grad_accum * frobenius_decay(self.model) if t.frob_decay > 0 else loss
                obj.backward()
            total += loss.detach()  # the task's loss; Frobenius decay is a regulariser, not logged as loss
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.wrapped.parameters(), t.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1  # counts optimizer steps only
        return total  # type: ignore[return-value]

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The task's held-out evaluation (loss, and accuracy; perplexity for language models)."""
        self.wrapped.eval()
        try:
            return {"step": self.step, **self.task.evaluate(self)}
        finally:
            self.wrapped.train()

    def fit(self) -> dict:
        """Train to ``max_steps`` (or ``stop_after``): step, log, evaluate, checkpoint; returns the summary
        (also written to ``summary.json``)."""
        t, env = self.t, self.env
        bar = self._open_outputs()
        units_per_step = self.task.units_per_batch * t.grad_accum * env.world
        pace = _Pace(self.step)
        end = min(t.max_steps, t.stop_after) if t.stop_after else t.max_steps
        if self.step == 0:
            self.hook.start(self)
        lazy = self._lazy_checks()
        with stop.deferred(enabled=not self.env.distributed) as asked:  # Ctrl-C: stop after a whole step
            while self.step < end:
                loss_t = self._train_one(units_per_step, lazy, end)
                self._after_step(loss_t, pace, units_per_step, end, bar)
                bar.update(1)
                if asked:
                    self._stop_here(asked[0], bar)
        bar.close()
        self._sync()
        self.train_time += time.perf_counter() - pace.loop_start - pace.side
        summary = self._summary(pace.tps)
        if env.is_main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
            if self.writer:
                self.writer.close()
        return summary

    def _stop_here(self, signum: int, bar) -> None:
        """A stop request between steps: checkpoint this step (unless it just was), then raise :class:`Stopped`."""
        bar.close()
        if not (self.out / "checkpoints" / f"step-{self.step:09d}").is_dir():
            self.save()
        log.info("stopping at step %d (checkpoint saved)", self.step)
        raise stop.Stopped(signum)

    def _open_outputs(self):
        """TensorBoard writer (main process) and the progress bar."""
        if self.env.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "tb"))
        from tqdm import tqdm

        return tqdm(total=self.t.max_steps, initial=self.step, disable=not (self.env.is_main and self.t.progress),
                    desc="train")

    def _train_one(self, units_per_step: int, lazy: bool, end: int) -> torch.Tensor:
        """One optimizer step with its FLOP/token accounting, the non-finite guard and the method hook."""
        t = self.t
        flops_per_unit = self.flops_per_unit
        loss_t = self.train_step()
        self.model_flops += flops_per_unit * units_per_step
        self.guard.note(loss_t, self.step)
        due = (self.step % t.log_interval == 0 or self.step % t.eval_interval == 0
               or self.step % t.ckpt_interval == 0 or self.step in (t.max_steps, end))
        if not lazy or due or self.hook.acts_at(self.step):
            self._raise_if_nonfinite()
        self.hook.after_step(self)
        self.units_seen += units_per_step
        return loss_t

    def _after_step(self, loss_t: torch.Tensor, pace: "_Pace", units_per_step: int, end: int, bar) -> None:
        """Log, evaluate and checkpoint when due; eval and checkpoint time is kept out of the throughput."""
        t, env = self.t, self.env
        log_now = self.step % t.log_interval == 0 or self.step == t.max_steps
        eval_now = self.step % t.eval_interval == 0 or self.step == t.max_steps
        ckpt_now = self.step % t.ckpt_interval == 0 or self.step in (t.max_steps, end)
        if log_now:
            loss = mean_across(float(loss_t), env)
            self._sync()
            pace.tps = units_per_step * (self.step - pace.s0) / max(1e-9, time.perf_counter() - pace.t0)
            pace.t0, pace.s0 = time.perf_counter(), self.step
            self.losses.append((self.step, loss))
            self._log_scalars(loss, pace.tps)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{pace.tps:.0f}")
        if eval_now or ckpt_now:
            self._sync()
        ts = time.perf_counter()
        if eval_now:
            ev = self.evaluate()
            self.evals.append(ev)
            if self.writer:
                for k, v in ev.items():
                    if k != "step":
                        self.writer.add_scalar(f"eval/{k}", v, self.step)
            if t.sample_every and self.step % t.sample_every == 0 and isinstance(self.run.model, LMConfig):
                tb_sample(self)
        if ckpt_now:
            self.train_time += ts - pace.loop_start - pace.side  # bank the training time so far in the checkpoint
            pace.side, pace.loop_start = 0.0, time.perf_counter()
            ts = pace.loop_start
            self.save()
        pace.side += time.perf_counter() - ts

    def _summary(self, tps_last: float) -> dict:
        """The run's ``summary.json``: evals, sizes, ranks, whole-run throughput and MFU, the method's part."""
        t, env, u = self.t, self.env, self.unit
        return {"step": self.step, "final_eval": self.evals[-1] if self.evals else None,
                "losses": self.losses, "evals": self.evals, "params": count_params(self.model),
                "trainable_params": count_params(self.model, trainable_only=True),
                "compression": compression_summary(self.model),
                "optimizer_state_bytes": self.optimizer_state_bytes(),
                "ranks": model_ranks(self.model),
                # whole run (every stage, resumed segments included), eval and checkpoints left out
                f"{u}_per_s": self.units_seen / max(1e-9, self.train_time),
                f"{u}_seen": self.units_seen, "train_time_s": self.train_time,
                f"{u}_per_s_last_interval": tps_last, "unit": u,
                f"flops_per_{u[:-1]}": self.flops_per_unit, "model_flops": self.model_flops,
                "size_mb": size_mb(self.model), "forward_flops": forward_flops(self.task, self.model, env.device),
                "model_flops_per_s": self.model_flops / max(1e-9, self.train_time),
                "mfu": mfu(self.model_flops, self.train_time, device_peak_flops(env.device, t.peak_tflops), env.world),
                "replica_max_diff": self.replica_divergence(), "compiles": self.compiles,
                "graph_compiles": len(self.graph_compile_steps), "graph_compile_steps": self.graph_compile_steps,
                **self.hook.summary()}

    def _lazy_checks(self) -> bool:
        """On the GPU, no host sync per step: the non-finite flag is read at log/eval/checkpoint steps and
        before a method acts on the weights (CPU work is synchronous, so there it is read every step)."""
        return self.env.device.type == "cuda"

    def _raise_if_nonfinite(self) -> None:
        """Stop if any step so far (on any process) had a non-finite loss, before anything is checkpointed
        or a method acts on the weights. The last checkpoint on disk stays the newest finite one."""
        self.guard.check(self.env.distributed)

    def _sync(self) -> None:
        if self.env.device.type == "cuda":
            torch.cuda.synchronize()

    def optimizer_state_bytes(self) -> int:
        """Bytes of optimizer state held by this process (shards under FSDP2)."""
        n = 0
        for st in self.opt.state.values():
            for v in st.values():
                if torch.is_tensor(v):
                    v = v.to_local() if hasattr(v, "to_local") else v
                    n += v.numel() * v.element_size()
        return n

    @torch.no_grad()
    def replica_divergence(self) -> float:
        """Max difference of a per-parameter digest across processes (0.0 = identical replicas)."""
        if not (self.env.distributed and self.t.dist == "ddp"):
            return 0.0
        digest = torch.stack([torch.stack([p.double().sum(), p.double().square().sum(), p.double().flatten()[0]])
                              for _, p in sorted(self.model.named_parameters())]).flatten().to(self.env.device)
        gathered = [torch.empty_like(digest) for _ in range(self.env.world)]
        dist.all_gather(gathered, digest)
        return max((g - gathered[0]).abs().max().item() for g in gathered)

    def _log_scalars(self, loss: float, tps: float) -> None:
        if not self.writer:
            return
        w, s = self.writer, self.step
        w.add_scalar("train/loss", loss, s)
        if self.unit == "tokens":
            w.add_scalar("train/ppl", math.exp(min(loss, 50.0)), s)
        w.add_scalar("train/lr", self.opt.param_groups[0]["lr"], s)
        w.add_scalar(f"train/{self.unit}_per_s", tps, s)
        w.add_scalar("model/params", count_params(self.model), s)
        for name, r in model_ranks(self.model).items():
            w.add_scalar(f"rank/{name}", r, s)
        w.flush()

    # ------------------------------------------------------------------ checkpoints
    def meta(self) -> dict:
        return {"step": self.step, "method_state": self.hook.state(), "ranks": model_ranks(self.model),
                "losses": self.losses, f"{self.unit}_seen": self.units_seen, "train_time_s": self.train_time,
                "model_flops": self.model_flops, "evals": self.evals, "arch": self.run.model.arch,
                "size": self.run.model.size, "vocab_size": self.task.vocab_size,
                "model_config": dataclasses.asdict(self.model.config) if hasattr(self.model, "config") else
                {"family": self.run.model.family, **self.run.model.model_dict()}}

    def barrier(self) -> None:
        if self.env.distributed:
            dist.barrier()

    def _get_rng(self) -> dict:
        return {"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(self.env.device) if self.env.device.type == "cuda" else None}

    def _set_rng(self, st: dict) -> None:
        torch.set_rng_state(st["cpu"])
        if st.get("cuda") is not None and self.env.device.type == "cuda":
            torch.cuda.set_rng_state(st["cuda"], self.env.device)

    def save(self) -> None:
        """Checkpoint: full weights (safetensors), optimizer, every process's RNG state, meta."""
        msd, osd = full_state(self.wrapped, self.opt, self.t.dist, self.env)
        rng = [self._get_rng()]
        if self.env.distributed:
            rng = [None] * self.env.world  # type: ignore[list-item]
            dist.all_gather_object(rng, self._get_rng())
        tied = tied_duplicates(self.model)
        msd = {k: v for k, v in msd.items() if k not in tied}  # FSDP gathers tied weights twice
        if self.env.is_main:
            save_checkpoint(self.out / "checkpoints", self.step, msd, self.meta(),
                            {"optimizer": osd, "rng": rng, "step": self.step}, keep=self.t.keep_checkpoints)
        self.barrier()
