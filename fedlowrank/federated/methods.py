"""What a method changes in federated training: the global starting model, what a client
downloads, trains and uploads, and how updates are combined. One object per run; no
per-architecture branches (tensors are matched by key)."""
from __future__ import annotations

import logging
import re
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedlowrank.config import FederatedRun, to_dataclass
from fedlowrank.config.fed_lora import FedLoRAConfig
from fedlowrank.methods.inrank import InRankConfig
from fedlowrank.methods.relora import ReLoRA, ReLoRAConfig
from fedlowrank.methods.welore import WeLoreConfig, is_norm_param, welore_compress
from fedlowrank.lowrank import factorize
from fedlowrank.lowrank.factorize import set_submodule
from fedlowrank.lowrank.layers import rank_from_budget
from fedlowrank.lowrank.lora import LoRALinear
from fedlowrank.training.optim import SGD

from . import lora_rules
from .aggregation import (State, aggregate, budget_ranks, client_view, expected_shapes, layer_ranks, merge_adapters,
                          without_each)
from .clipping import clip_auto
from .lora import FLoRALinear, target_linears
from .rankadapt import adapt_ranks, due, layer_caps
from .task import build_model, fed_data

log = logging.getLogger(__name__)
Budget = dict[str, Any]
_B, _A = lora_rules.B_KEY, lora_rules.A_KEY  # a LoRA adapter's B (out, r) and A (r, in)


def _float_state(model: nn.Module) -> State:
    return {k: v.detach().float() if v.is_floating_point() else v.detach() for k, v in model.state_dict().items()}


class FedMethod:
    name = "none"
    """Factorized training (no extra method): the global model is factorized at the largest
    (slice/product) or smallest (fedlmt) budget; clients get it cut to their budget."""

    def __init__(self, run: FederatedRun) -> None:
        self.run = run

    def global_budget(self) -> Budget:
        f = self.run.fed
        pick = min if self.run.strategy == "fedlmt" else max
        budgets = [f.budget(i) for i in range(f.num_clients)]  # listed, or derived from the devices
        (key, _), = budgets[0].items()  # rank | ratio | params
        return {key: pick(b[key] for b in budgets)}

    def initial_state(self) -> State:
        torch.manual_seed(self.run.seed)
        if self.run.strategy == "fedavg":  # dense baseline: no factorized layer, plain FedAvg
            return _float_state(build_model(self.run))
        model = build_model(self.run)
        budget = self.global_budget()
        if "params" in budget:  # full rank, then each layer's first r slots of its SVD: the best rank-r start
            factorize(model, ratio=1.0, targets=self.run.model.get("targets"), skip=self.run.model.get("skip"))
            state = _float_state(model)
            return client_view(state, budget_ranks(state, **budget), "slice")
        factorize(model, **budget, targets=self.run.model.get("targets"), skip=self.run.model.get("skip"))
        return _float_state(model)

    def ranks(self, global_state: State, budget: Budget) -> dict[str, int]:
        if self.run.strategy == "fedlmt":
            return layer_ranks(global_state)
        return budget_ranks(global_state, **budget)

    def view(self, global_state: State, budget: Budget) -> State:
        return client_view(global_state, self.ranks(global_state, budget), self.run.strategy)

    def budget_views(self) -> bool:
        """Whether clients with different budgets download different models."""
        return self.run.strategy not in ("fedlmt", "fedavg")

    def evaluate_at_budget(self) -> bool:
        """Whether a client's personalised evaluation scores the global model cut to its budget (its download)
        rather than the whole global model."""
        return self.budget_views()

    def prepare_client(self, model: nn.Module, budget: Budget) -> None:
        """Client side, after loading the view: attach/freeze what the method needs."""

    def payload(self, model: nn.Module) -> State:
        return _float_state(model)

    def local_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer | SGD:
        """A client's optimizer for one round: SGD with ``fed.lr``, ``fed.momentum``, ``fed.weight_decay``
        (torch's update, without torch.optim's import of torch._dynamo: :class:`.training.optim.SGD`)."""
        f = self.run.fed
        return SGD(params, lr=f.lr, momentum=f.momentum, weight_decay=f.weight_decay)

    def expected(self, view: State, budget: Budget) -> dict[str, tuple[int, ...]]:
        return expected_shapes(view)

    def aggregate(self, global_state: State, updates: list[State], weights: list[float],
                  views: list[State] | None = None) -> State:
        """``views``: what each client downloaded (``product`` aggregates changes relative to it)."""
        return aggregate(global_state, updates, weights, self.run.strategy, views)

    def without_each(self, global_state: State, updates: list[State], weights: list[float]) -> list[State] | None:
        """:meth:`aggregate` of ``updates`` without each one in turn, in closed form where the method aggregates
        with the base rules (:func:`.aggregation.without_each`); None where it does not."""
        if type(self).aggregate is not FedMethod.aggregate:
            return None
        return without_each(global_state, updates, weights, self.run.strategy)

    def adapt(self, global_state: State, rnd: int) -> State:
        """Server side, after round ``rnd``'s aggregation: change the global model's shape (rank
        adaptation). Default: unchanged."""
        return global_state

    def clip_auto(self, pairs: list[tuple[State, State]], factor: float):
        """``fed.clip_auto`` on (view, update) pairs (:func:`fedlowrank.federated.clipping.clip_auto`)."""
        return clip_auto(pairs, factor)

    def penalty(self, model: nn.Module):
        """Client side: a term added to every local step's loss (None: nothing)."""
        return None

    def match_expected(self, expected: dict[str, tuple[int, ...]], declared: dict[str, tuple[int, ...]]
                       ) -> dict[str, tuple[int, ...]]:
        """Server side: the reply shapes to check a reply against, given the shapes it declares (read from its
        metadata only): ``expected``, unless the method allows another form (HetLoRA's pruned adapters)."""
        return expected

    def next_budget(self, budget: Budget, update: State) -> Budget:
        """Server side, after accepting ``update``: the client's budget from now on (default: unchanged)."""
        return budget

    def keeps_budget(self, configured: Budget, resumed: Budget) -> bool:
        """On resume: whether a client keeps the budget its checkpoint saved instead of the configured one."""
        return False


class ReLoRAFed(FedMethod):
    name = "relora"
    """Clients train fresh LoRA adapters (rank from their budget) on the frozen dense global
    model; the server merges every client's product into the dense weights each round."""

    def __init__(self, run: FederatedRun) -> None:
        super().__init__(run)
        self.cfg = to_dataclass(ReLoRAConfig, run.method, "method")
        self._expected: dict[tuple, dict[str, tuple[int, ...]]] = {}  # budget -> reply shapes

    def initial_state(self) -> State:
        torch.manual_seed(self.run.seed)
        return _float_state(build_model(self.run))

    def view(self, global_state: State, budget: Budget) -> State:
        return {k: v.clone() for k, v in global_state.items()}

    def budget_views(self) -> bool:
        return False  # every client downloads the same dense model

    def prepare_client(self, model: nn.Module, budget: Budget) -> None:
        ReLoRA(self.cfg).wrap(model, r=budget.get("rank"), ratio=budget.get("ratio"))

    def payload(self, model: nn.Module) -> State:
        keep = {n for n, p in model.named_parameters() if p.requires_grad}
        return {k: v for k, v in _float_state(model).items() if k in keep or k.endswith(".scaling")}

    def expected(self, view: State, budget: Budget) -> dict[str, tuple[int, ...]]:
        """Shapes of a client's reply: depend only on its budget (the dense model never changes shape)."""
        key = tuple(sorted(budget.items()))
        if key not in self._expected:
            model = build_model(self.run)
            self.prepare_client(model, budget)
            self._expected[key] = expected_shapes(self.payload(model))
        return self._expected[key]

    def aggregate(self, global_state: State, updates: list[State], weights: list[float],
                  views: list[State] | None = None) -> State:
        return merge_adapters(global_state, updates, weights)  # adapters are changes already


class WeLoreFed(FedMethod):
    name = "welore"
    """The federated starting point is a trained dense model compressed by WeLore
    (non-uniform ranks); clients fine-tune only its low-rank components, at their budget."""

    def __init__(self, run: FederatedRun) -> None:
        super().__init__(run)
        self.cfg = to_dataclass(WeLoreConfig, run.method, "method")

    def initial_state(self) -> State:
        from fedlowrank.checkpoint import load_tensors

        torch.manual_seed(self.run.seed)
        model = build_model(self.run)
        if self.cfg.from_ckpt:
            model.load_state_dict(load_tensors(self.cfg.from_ckpt))
            log.info("WeLore: dense starting model from %s", self.cfg.from_ckpt)
        elif self.cfg.pretrain_steps > 0:
            self._pretrain(model)
        welore_compress(model, self.cfg)
        return _float_state(model)

    def _pretrain(self, model: nn.Module) -> None:
        """Stand-in for a model trained elsewhere: a few SGD steps on the training split."""
        fd = fed_data(self.run)
        pool = torch.as_tensor(np.concatenate(fd.train_parts), dtype=torch.long)  # the clients' training data
        g = torch.Generator().manual_seed(self.run.seed)
        opt = SGD(list(model.parameters()), lr=self.run.fed.lr, momentum=0.9)
        for _ in range(self.cfg.pretrain_steps):
            idx = pool[torch.randint(len(pool), (self.run.fed.batch_size,), generator=g)]
            logits = model(fd.x[idx])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), fd.y[idx].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
        log.info("WeLore: pretrained the dense model for %d steps (loss %.3f)", self.cfg.pretrain_steps, loss.item())

    def prepare_client(self, model: nn.Module, budget: Budget) -> None:
        for n, p in model.named_parameters():
            p.requires_grad_(n.endswith((".U", ".V")) or (self.cfg.train_norms and is_norm_param(model, n))
                             or any(re.search(x, n) for x in self.cfg.train_extra))


class InRankFed(FedMethod):
    name = "inrank"
    """Rank-adaptive federated training: the global model starts at ``init_rank + buffer`` per layer
    and the server adapts every layer's rank to the explained ratio of the aggregate each round
    (:mod:`.rankadapt`). A client's budget caps the slots it trains: min(global rank, budget)."""

    def __init__(self, run: FederatedRun) -> None:
        super().__init__(run)
        self.cfg = to_dataclass(InRankConfig, run.method, "method")  # checked by FederatedRun.validate
        self.last: dict[str, tuple[int, int, int]] = {}  # layer -> (old R, explained k, new R), last check
        self._caps: dict[str, int] | None = None  # per-layer rank cap: fixed by the layer shapes and budgets

    def caps(self, state: State) -> dict[str, int]:
        if self._caps is None:
            self._caps = layer_caps(state, self.cfg, self.global_budget())
        return self._caps

    def initial_state(self) -> State:
        state = super().initial_state()  # factorized at the largest (fedlmt: smallest) budget
        caps = self.caps(state)
        start = {p: min(caps[p], self.cfg.init_rank + self.cfg.buffer) for p in caps}
        return client_view(state, start, "product")  # optimal truncation to the starting ranks

    def adapt(self, global_state: State, rnd: int) -> State:
        if not due(self.cfg, rnd):
            return global_state
        new, self.last = adapt_ranks(global_state, self.cfg, self.caps(global_state), self.run.seed, rnd)
        return new


class LoRAFed(FedMethod):
    name = "lora"
    """LoRA fine-tuning of a pretrained LLM (:mod:`.lora`): the global state, downloads and replies are adapters
    only; the strategy is one of :data:`.lora_rules.LORA_RULES`."""

    def __init__(self, run: FederatedRun) -> None:
        super().__init__(run)
        self.cfg = to_dataclass(FedLoRAConfig, run.method, "method")
        self.alpha = lora_rules.run_alpha(self.cfg.alpha, self.cfg.scaling)
        self.rule = run.strategy
        self._dims: dict[str, tuple[int, int]] | None = None  # adapted layer -> (out, in)

    def dims(self) -> dict[str, tuple[int, int]]:
        if self._dims is None:
            self._dims = {n: (m.out_features, m.in_features) for n, m in target_linears(build_model(self.run),
                                                                                          self.cfg).items()}
        return self._dims

    def layer_ranks(self, budget: Budget) -> dict[str, int]:
        """Per adapted layer, the rank a budget allows (``fed.ranks``: that rank; ratios: of min(out, in))."""
        return {p: rank_from_budget(min(o, i), **budget) for p, (o, i) in self.dims().items()}

    def initial_state(self) -> State:
        """Adapters at the largest budget's ranks: A Kaiming-uniform from ``method.init_seed``, B = 0 (ΔW = 0)."""
        ranks = self.layer_ranks(self.global_budget())
        g = torch.Generator().manual_seed(self.run.seed if self.cfg.init_seed is None else self.cfg.init_seed)
        state: State = {}
        for p, (o, i) in self.dims().items():
            if self.rule == "flora":  # nothing merged yet: one zero direction (ΔW = 0)
                state[p + lora_rules.MERGED_U], state[p + lora_rules.MERGED_V] = torch.zeros(o, 1), torch.zeros(1, i)
                continue
            bound = 1.0 / i ** 0.5  # nn.Linear's (and LoRALinear.reinit's) Kaiming-uniform bound
            state[p + _B] = torch.zeros(o, ranks[p])
            state[p + _A] = torch.empty(ranks[p], i).uniform_(-bound, bound, generator=g)
        return state

    def ranks(self, global_state: State, budget: Budget) -> dict[str, int]:
        return self.layer_ranks(budget)

    def view(self, global_state: State, budget: Budget) -> State:
        return lora_rules.view(self.rule, global_state, self.layer_ranks(budget), self.alpha)

    def budget_views(self) -> bool:
        return True

    def evaluate_at_budget(self) -> bool:
        return False  # a fine-tuning run produces the whole global adapter: that is what clients are scored with

    def prepare_client(self, model: nn.Module, budget: Budget) -> None:
        if self.rule == "flora":  # a fresh adapter of the client's rank on the merged model, every round
            ranks = self.layer_ranks(budget)
            for p, m in [(n, m) for n, m in model.named_modules() if isinstance(m, FLoRALinear)]:
                set_submodule(model, p, m.fresh(ranks[p], self.alpha, self.cfg.dropout))
        if self.rule == "ffa":  # FFA-LoRA: A stays the shared random one
            for m in model.modules():
                if isinstance(m, LoRALinear):
                    m.adapter.V.requires_grad_(False)

    def payload(self, model: nn.Module) -> State:
        keys = (_B,) if self.rule == "ffa" else (_B, _A)
        out = {k: v.detach().float() for k, v in model.state_dict().items() if k.endswith(keys)}
        if self._pruning() and float(self.tail_norm(model).detach()) < getattr(self, "_tail0", -1.0):
            out = {k: (v[:, :self.pruned_rank(v.shape[1])] if k.endswith(_B) else v[:self.pruned_rank(v.shape[0])])
                   .contiguous() for k, v in out.items()}  # HetLoRA: the tail shrank, the client prunes its rank
        return out

    def expected(self, view: State, budget: Budget) -> dict[str, tuple[int, ...]]:
        if self.rule == "flora":  # the fresh adapters: shapes from the budget
            return {k: s for p, r in self.layer_ranks(budget).items() for k, s in
                    ((p + _B, (self.dims()[p][0], r)), (p + _A, (r, self.dims()[p][1])))}
        keys = (_B,) if self.rule == "ffa" else (_B, _A)
        return {k: s for k, s in expected_shapes(view).items() if k.endswith(keys)}

    def aggregate(self, global_state: State, updates: list[State], weights: list[float],
                  views: list[State] | None = None) -> State:
        return lora_rules.aggregate(self.rule, global_state, updates, weights, self.alpha, views)

    def local_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer | SGD:
        if self.cfg.optimizer == "sgd":
            return super().local_optimizer(params)
        return torch.optim.AdamW(params, lr=self.run.fed.lr, weight_decay=self.run.fed.weight_decay)

    def clip_auto(self, pairs: list[tuple[State, State]], factor: float):
        """In the space of each client's ΔW = (α/r)·B·A, not of the factors (:func:`.lora_rules.clip_auto`)."""
        return lora_rules.clip_auto(pairs, factor, self.alpha)

    # HetLoRA's rank self-pruning (strategy=hetlora, method.prune_lambda > 0)
    def _pruning(self) -> bool:
        return self.rule == "hetlora" and self.cfg.prune_lambda > 0

    def pruned_rank(self, r: int) -> int:
        """The rank a client of rank r prunes to: floor(γ·r), at least 1 and below r (r itself at 1)."""
        return max(1, min(r - 1, int(self.cfg.prune_gamma * r))) if r > 1 else r

    def tail_norm(self, model: nn.Module) -> torch.Tensor:
        """Σ over adapters of ‖(α/r)·B[:, r':]·A[r':]‖_F, r' the pruned rank (from tr((BᵀB)(AAᵀ)), no dense
        matrix); differentiable."""
        total = torch.zeros(())
        for m in model.modules():
            if isinstance(m, LoRALinear) and self.pruned_rank(m.rank) < m.rank:
                t = self.pruned_rank(m.rank)
                B, A = m.adapter.U[:, t:].float(), m.adapter.V[t:].float()
                sq = ((B.T @ B) * (A @ A.T)).sum().clamp_min(0)
                total = total + lora_rules.lora_scale(self.alpha, m.rank) * (sq + 1e-30).sqrt()
        return total

    def penalty(self, model: nn.Module):
        if not self._pruning():
            return None
        with torch.no_grad():
            self._tail0 = float(self.tail_norm(model))  # where the round starts
        return lambda: self.cfg.prune_lambda * self.tail_norm(model)

    def _pruned_shapes(self, expected: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        return {k: ((s[0], self.pruned_rank(s[1])) if k.endswith(_B) else (self.pruned_rank(s[0]), s[1]))
                for k, s in expected.items()}

    def match_expected(self, expected: dict[str, tuple[int, ...]], declared: dict[str, tuple[int, ...]]
                       ) -> dict[str, tuple[int, ...]]:
        pruned = self._pruned_shapes(expected) if self._pruning() else expected
        return pruned if declared == pruned and pruned != expected else expected

    def keeps_budget(self, configured: Budget, resumed: Budget) -> bool:
        """A budget a client pruned to (smaller, of the same kind) survives a resume."""
        return self._pruning() and resumed.keys() == configured.keys() and all(
            0 < resumed[k] < configured[k] for k in configured)

    def next_budget(self, budget: Budget, update: State) -> Budget:
        """A pruned reply: the client keeps its smaller rank (``fed.ranks``), or γ times its ratio."""
        if not self._pruning():
            return budget
        r = max((v.shape[1] for k, v in update.items() if k.endswith(_B)), default=0)
        if r == 0 or r >= max(self.layer_ranks(budget).values()):
            return budget
        return {"rank": r} if "rank" in budget else {k: v * self.cfg.prune_gamma for k, v in budget.items()}


def fed_method(run: FederatedRun) -> FedMethod:
    name = run.method.get("name", "none")
    return {"none": FedMethod, "relora": ReLoRAFed, "welore": WeLoreFed, "inrank": InRankFed,
            "lora": LoRAFed}[name](run)
