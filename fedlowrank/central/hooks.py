"""Method hooks for the central trainer: each method (InRank, ReLoRA, WeLore) is a small
policy object called at fixed points; the trainer owns wrapping, optimizers and checkpoints."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from fedlowrank.checkpoint import CheckpointError, atomic_write_bytes
from fedlowrank.config import to_dataclass
from fedlowrank.lowrank import count_params, lowrank_modules, set_ranks
from fedlowrank.methods.inrank import InRank, InRankConfig
from fedlowrank.methods.relora import ReLoRA, ReLoRAConfig, adapter_param_groups
from fedlowrank.methods.welore import WeLoreConfig, WeLorePlan, apply_welore, freeze_non_lrc, welore_compress
from fedlowrank.training.optim import param_groups
from fedlowrank.training.schedulers import cosine_lr

from .dist import load_checkpoint_meta, load_weights, resolve_checkpoint, save_checkpoint
from .resume import check_meta, check_ranks, check_weights

if TYPE_CHECKING:
    from .trainer import Trainer

log = logging.getLogger(__name__)


class Hook:
    """No method: dense or fixed-rank training."""

    def setup(self, tr: "Trainer") -> None:
        """Fresh run, before the model is wrapped."""

    def restore(self, tr: "Trainer", state: dict) -> None:
        """Resume: rebuild the model structure recorded in ``state`` before weights are loaded."""

    def start(self, tr: "Trainer") -> None:
        """Fresh run, after wrapping, before the first step (the model can be evaluated here)."""

    def lr(self, tr: "Trainer", step: int) -> float:
        t = tr.t
        return cosine_lr(step, t.max_steps, t.lr, t.warmup_steps, t.min_lr_ratio)

    def param_groups(self, tr: "Trainer") -> list[dict]:
        """AdamW parameter groups over the trainable parameters."""
        return param_groups(tr.wrapped, tr.t.weight_decay)

    def after_step(self, tr: "Trainer") -> None:
        """After optimizer step ``tr.step`` (1-based count of steps done)."""

    def acts_at(self, step: int) -> bool:
        """Whether ``after_step`` may change the weights or structure at ``step`` (the trainer then checks
        that training is still finite first). Methods that override ``after_step`` say True unless they know."""
        return type(self).after_step is not Hook.after_step

    def state(self) -> dict:
        return {}

    def summary(self) -> dict:
        return {}


class InRankHook(Hook):
    def __init__(self, cfg: InRankConfig, seed: int) -> None:
        self.ir = InRank(cfg, seed)
        self.stage = cfg.stage

    def setup(self, tr: "Trainer") -> None:
        if self.stage == 1:
            self.ir.prepare(tr.model)
            return
        path = Path(self.ir.cfg.stage1_ckpt)  # type: ignore[arg-type]
        meta = check_meta(load_checkpoint_meta(path), path / "meta.json", tr.t.max_steps, tr.unit)
        check_ranks(tr.model, meta["ranks"], f"{path / 'meta.json'}: ranks")
        set_ranks(tr.model, meta["ranks"])
        check_weights(tr.model, resolve_checkpoint(path) / "model.safetensors")
        load_weights(tr.model, path)
        tr.step = int(meta["step"])
        log.info("InRank stage 2 from %s at step %d", path, tr.step)

    def restore(self, tr: "Trainer", state: dict) -> None:
        if state.get("stage", self.stage) not in (1, 2) or not isinstance(state.get("history", []), list) or \
                not all(isinstance(h, dict) and isinstance(h.get("changes", {}), dict) for h in state.get("history", [])):
            raise CheckpointError("method_state: stage must be 1 or 2 and history a list of growth records")
        if state.get("kept") is not None:
            check_ranks(tr.model, state["kept"], "method_state.kept")
        self.stage = int(state.get("stage", self.stage))
        self.ir.history = list(state.get("history", []))
        kept = state.get("kept")
        if kept is None:  # a checkpoint from before the kept search: the last growth of each layer, less the buffer
            kept = {n: self.ir.cfg.init_rank for n in lowrank_modules(tr.model)}
            for h in self.ir.history:
                kept.update({n: max(kept.get(n, 1), new - self.ir.cfg.buffer) for n, (_, new) in h["changes"].items()})
        self.ir.kept = {n: int(k) for n, k in kept.items()}

    def acts_at(self, step: int) -> bool:
        return self.stage == 1 and (self.ir.due(step) or step == self.ir.cfg.stage1_steps)

    def after_step(self, tr: "Trainer") -> None:
        ir = self.ir
        if self.stage != 1:
            return
        if ir.due(tr.step):
            targets = tr.broadcast(ir.targets(tr.model) if tr.env.is_main else None)
            ir.keep(targets)  # every process keeps the same ranks
            grow = {n: r for n, r in targets.items() if r > lowrank_modules(tr.model)[n].rank}
            if grow:
                tr.apply_rank_change(lambda m: ir.apply(m, grow, tr.step))
        if tr.step == ir.cfg.stage1_steps:
            ranks = tr.broadcast(ir.compressed_ranks(tr.model) if tr.env.is_main else None)
            tr.apply_rank_change(lambda m: ir.compress(m, ranks))
            self.stage = 2
            if tr.env.is_main:
                save_checkpoint(tr.out / "stage1", tr.step, tr.model.state_dict(), tr.meta(), None, keep=1)
                log.info("InRank stage 1 done at step %d: compressed checkpoint %s (%d params)", tr.step,
                         tr.out / "stage1", count_params(tr.model))
            tr.barrier()

    def state(self) -> dict:
        return {"stage": self.stage, "history": self.ir.history, "kept": self.ir.kept}

    def summary(self) -> dict:
        return {"stage": self.stage, "inrank_history": self.ir.history}


class ReLoRAHook(Hook):
    def __init__(self, cfg: ReLoRAConfig, seed: int, max_steps: int) -> None:
        self.rl = ReLoRA(cfg, seed, max_steps)
        self.max_steps = max_steps
        self.wrapped = False
        self.restarts = 0

    def setup(self, tr: "Trainer") -> None:
        if self.rl.cfg.warm_start_steps == 0:
            self.rl.wrap(tr.model)
            self.wrapped = True

    def restore(self, tr: "Trainer", state: dict) -> None:
        restarts, wrapped = state.get("restarts", 0), state.get("wrapped", False)
        if type(restarts) is not int or not 0 <= restarts <= self.max_steps or not isinstance(wrapped, bool):
            raise CheckpointError(f"method_state: restarts={restarts!r} must be an integer in [0, trainer.max_steps] "
                                  f"and wrapped={wrapped!r} true or false")
        self.restarts = restarts
        if wrapped:
            self.rl.wrap(tr.model)
            self.wrapped = True

    def lr(self, tr: "Trainer", step: int) -> float:
        t = tr.t
        return self.rl.lr(step, t.max_steps, t.lr, t.warmup_steps, t.min_lr_ratio)

    def param_groups(self, tr: "Trainer") -> list[dict]:
        if not self.wrapped:
            return super().param_groups(tr)
        return adapter_param_groups(tr.model, tr.t.weight_decay, (tr.t.beta1, tr.t.beta2), self.rl.cfg)

    def after_step(self, tr: "Trainer") -> None:
        if not self.wrapped and tr.step == self.rl.cfg.warm_start_steps:
            self.rl.wrap(tr.model)
            self.wrapped = True
            tr.rebuild()
            log.info("ReLoRA: full-rank warm start done at step %d; adapters attached", tr.step)
        elif self.wrapped and self.rl.is_restart(tr.step, tr.t.max_steps):
            self.rl.restart(tr.model, tr.opt, tr.step)
            self.restarts += 1

    def state(self) -> dict:
        return {"wrapped": self.wrapped, "restarts": self.restarts}

    def summary(self) -> dict:
        return {"relora_restarts": self.restarts}


class WeLoreHook(Hook):
    def __init__(self, cfg: WeLoreConfig) -> None:
        self.cfg = cfg
        self.plan: WeLorePlan | None = None
        self.report: dict = {}

    def setup(self, tr: "Trainer") -> None:
        if self.cfg.from_ckpt:
            load_weights(tr.model, Path(self.cfg.from_ckpt))
            log.info("WeLore: loaded dense weights from %s", self.cfg.from_ckpt)
        if self.cfg.pretrain_steps == 0 and tr.t.dist == "fsdp":  # FSDP2: no restructuring after sharding
            self._compress(tr, evaluate=False)

    def start(self, tr: "Trainer") -> None:
        """No pretraining (a loaded or given model): compress now, with held-out evals before and after."""
        if self.plan is None and self.cfg.pretrain_steps == 0:
            self._compress_and_report(tr)

    def restore(self, tr: "Trainer", state: dict) -> None:
        self.report = state.get("report", {})
        if state.get("plan"):
            self.plan = _checked_plan(tr.model, state["plan"])
            apply_welore(tr.model, self.plan, from_weights=False)
            freeze_non_lrc(tr.model, self.plan, self.cfg.train_extra, self.cfg.train_norms)

    def _compress(self, tr: "Trainer", evaluate: bool) -> None:
        before = count_params(tr.model)
        if evaluate:
            self.report["dense_eval"] = tr.evaluate()
        self.plan = welore_compress(tr.model, self.cfg)  # deterministic: identical on every process
        if tr.env.is_main:  # the plan (per-matrix ranks) beside the run's checkpoints; also in every checkpoint
            atomic_write_bytes(tr.out / "welore_plan.json", json.dumps(self.plan.to_dict(), indent=2).encode())
        self.report.update(params_before=before, params_after=count_params(tr.model),
                           trainable_params=count_params(tr.model, trainable_only=True), step=tr.step)

    def _compress_and_report(self, tr: "Trainer") -> None:
        self._compress(tr, evaluate=True)
        tr.rebuild()
        self.report["compressed_eval"] = tr.evaluate()
        log.info("WeLore at step %d: held-out ppl %.3f -> %.3f after compression (%.1f%% fewer parameters)",
                 tr.step, self.report["dense_eval"]["ppl"], self.report["compressed_eval"]["ppl"],
                 100 * (1 - self.report["params_after"] / self.report["params_before"]))

    def after_step(self, tr: "Trainer") -> None:
        if self.plan is None and tr.step == self.cfg.pretrain_steps:
            self._compress_and_report(tr)

    def state(self) -> dict:
        return {"plan": self.plan.to_dict() if self.plan else None, "report": self.report}

    def summary(self) -> dict:
        r = dict(self.report)
        if r.get("params_before"):
            r["params_reduction"] = 1 - r["params_after"] / r["params_before"]
        return {"welore": {**r, **({"plan": self.plan.to_dict()} if self.plan else {})}}


def make_hook(method: dict, seed: int, max_steps: int) -> Hook:
    name = method.get("name", "none")
    if name == "inrank":
        return InRankHook(to_dataclass(InRankConfig, method, "method"), seed)
    if name == "relora":
        return ReLoRAHook(to_dataclass(ReLoRAConfig, method, "method"), seed, max_steps)
    if name == "welore":
        return WeLoreHook(to_dataclass(WeLoreConfig, method, "method"))
    return Hook()


def _checked_plan(model: nn.Module, plan: object) -> WeLorePlan:
    """A checkpoint's WeLore plan: known fields; every LRC a linear of the model at a rank in [1, min(in, out)]."""
    fields = set(WeLorePlan.__dataclass_fields__)
    if not isinstance(plan, dict) or set(plan) - fields or not isinstance(plan.get("ranks"), dict) or \
            not isinstance(plan.get("dense", []), list):
        raise CheckpointError(f"method_state.plan must be an object with fields of {sorted(fields)}")
    for name, k in plan["ranks"].items():
        lin = model.get_submodule(name) if isinstance(name, str) and name in dict(model.named_modules()) else None
        if not isinstance(lin, nn.Linear) or type(k) is not int or not 1 <= k <= min(lin.in_features, lin.out_features):
            raise CheckpointError(f"method_state.plan.ranks[{str(name)[:60]!r}]={k!r} is no rank of a linear layer "
                                  "of this run's model")
    try:
        return WeLorePlan(**plan)
    except TypeError as e:
        raise CheckpointError(f"method_state.plan: {e}") from None
