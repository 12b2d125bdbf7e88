"""Leave-one-out screening of client updates (``fed.screen=loo``): Reject On Negative Influence (Nelson et al. 2008;
in federated learning Fang et al. 2020's loss-function based rejection), on a small validation sample the server
holds, at every client budget.

Each round the server aggregates the valid updates with and without each client, cuts both results to every
budget of the run, and measures the loss on its sample. A client whose inclusion raises that loss at some budget by
more than ``fed.screen_tolerance`` (relative) is rejected. Norms and cosines cannot separate an attacker from an
honest client whose budget or data differ (their changes differ in size by 20x and point in near-orthogonal
directions); the loss the aggregate reaches can. The sample is drawn from the clients' held-out splits, which no
client trains on (a deployment gives the server its own small clean set, as FLTrust assumes)."""
from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from fedlowrank.config import ConfigError, FederatedRun
from fedlowrank.training.batches import batches
from fedlowrank.training.loop import evaluate_classifier

from .aggregation import State
from .bn_stats import server_sample
from .directions import counted, round_cosines
from .screen_eval import MAX_STACKED, StackedLosses, batch_statistics, numel

log = logging.getLogger(__name__)
MIN_CLIENTS = 3  # with fewer, "without client i" is one other client's update: no majority to compare with
# fed.screen=exclude excludes only when judging at least 4 valid replies: among 3, leaving one out weighs a client
# against two others alone, and honest clients rose above 2 nats there (2.0-2.6, bench_attacks 2026-12-05); a reply
# above the bound among 3 is rejected for its round (an honest client diverging there rose by 16.5 nats)
MIN_EXCLUDE = 4


class LooScreen:
    """The server's validation sample and the run's budgets; :meth:`flagged` names the clients to reject."""

    def __init__(self, run: FederatedRun, method,
                 without_each: Callable[[list], list[State] | None] = lambda valid: None) -> None:
        """``without_each``: valid entries -> the aggregate without each, in closed form (None: combine each
        subset)."""
        sample = server_sample(run)
        if sample is None:
            raise ConfigError("fed.screen=loo needs clients' held-out splits to draw the server's sample from "
                              "(image tasks: fed.client_holdout > 0)")
        self.loader = batches(sample, 256)
        self.run, self.method = run, method
        self._skeletons: dict[tuple, torch.nn.Module] = {}  # tensor shapes -> a model of those shapes, reloaded
        self.without_each = without_each
        self.stacked = StackedLosses(self.model, self.loader)
        budgets = {tuple(sorted(run.fed.budget(i).items())) for i in range(run.fed.num_clients)}
        self.budgets = [dict(b) for b in sorted(budgets)] if method.budget_views() else [None]

    def losses(self, state: State, budgets: list[dict | None] | None = None) -> list[float]:
        """Loss on the sample of ``state`` cut to each of ``budgets`` (default: the run's; the whole model when
        budgets share one view)."""
        out = []
        for b in self.budgets if budgets is None else budgets:
            model = self.model(state if b is None else self.method.view(state, b))
            out.append(evaluate_classifier(model, self.loader)["loss"])
        return out

    def model(self, state: State) -> torch.nn.Module:
        """:func:`.client.model_from_state`, building one model per set of tensor shapes and reloading it after
        (evaluation changes nothing in it; ``method=lora`` builds each time: its state holds only the adapters)."""
        from .client import model_from_state

        if self.run.method.get("name") == "lora":
            return model_from_state(self.run, state)
        key = tuple((k, tuple(v.shape)) for k, v in state.items())
        if key not in self._skeletons:
            if len(self._skeletons) > 2 * len(self.budgets):  # shapes that change every round (rank growth)
                self._skeletons.clear()
            self._skeletons[key] = batch_statistics(model_from_state(self.run, state))
        else:
            self._skeletons[key].load_state_dict(state, strict=True)
        return self._skeletons[key]

    def held(self, valid: list) -> list[dict | None]:
        """The run's budgets up to the largest one a client in ``valid`` holds: a larger budget's model has rank
        slots nobody in the round trained (at their initial or retired values), so its loss says nothing of the
        round's replies (an absent top client made an honest mid client's rise there reach 2.2 nats)."""
        f = self.run.fed
        top = max(_size(f.budget(v[0])) for v in valid)
        return [b for b in self.budgets if b is None or _size(b) <= top]

    def leave_one_out(self, valid: list, combine: Callable[[list], State]):
        """For each index i in ``valid``: (i, [(loss with, loss without client i, budget) at each budget its slots
        reach that a client of ``valid`` holds]). ``combine`` aggregates a list of valid entries into a global
        state."""
        scope = self.held(valid)
        table = self.subset_losses([valid] + [valid[:i] + valid[i + 1:] for i in range(len(valid))], combine, scope,
                                   lambda: self.without_each(valid))
        for i in range(len(valid)):
            yield i, self.at_or_above(table[0], table[i + 1], self.run.fed.budget(valid[i][0]), scope)

    def subset_losses(self, subsets: list[list], combine: Callable[[list], State], scope: list[dict | None],
                      rest: Callable[[], list[State] | None] | None = None) -> list[list[float]]:
        """[subset][budget]: the loss of each subset's aggregate cut to each budget of ``scope``, the aggregates of
        one budget evaluated together (:class:`.screen_eval.StackedLosses`) where they fit in memory at once;
        ``rest``: the aggregates of ``subsets[1:]`` computed at once (a closed form), or None to combine each."""
        first = combine(subsets[0])
        if self.stacked.batched is False or not scope or numel(first) * len(subsets) > MAX_STACKED:
            return [self.losses(first, scope)] + [self.losses(combine(s), scope) for s in subsets[1:]]
        states = [first] + ((rest() if rest is not None else None) or [combine(s) for s in subsets[1:]])
        cols = [self.stacked([s if b is None else self.method.view(s, b) for s in states]) for b in scope]
        return [list(row) for row in zip(*cols)]

    def flagged(self, valid: list, combine: Callable[[list], State]) -> dict[int, tuple[float, str]]:
        """Index in ``valid`` -> (relative loss increase its inclusion causes, at which budget), for every client
        above the tolerance."""
        if len(valid) < MIN_CLIENTS:
            return {}
        out = {}
        for i, reached in self.leave_one_out(valid, combine):
            worst, at = max(((_relative(f, w), b) for f, w, b in reached), key=lambda r: r[0])
            if worst > self.run.fed.screen_tolerance:
                out[i] = (float(worst), _name(at))
        return out

    def worst(self, valid: list, combine: Callable[[list], State], table: list | None = None
              ) -> tuple[int, float, str]:
        """(index in ``valid``, absolute loss rise in nats, budget) of the client whose inclusion raises the
        sample's loss the most, at its own or a larger budget (inf where only its inclusion breaks the model);
        ``table``: :meth:`table` of ``valid`` where already computed."""
        table = self.table(valid, combine) if table is None else table
        i = max(range(len(table)), key=lambda j: table[j][0]) if table else 0
        return (i, *table[i]) if table else (0, -np.inf, "")

    def table(self, valid: list, combine: Callable[[list], State]) -> list[tuple[float, str]]:
        """Per entry of ``valid``: (its largest rise in nats at its own or a larger budget, that budget)."""
        out = []
        for _, reached in self.leave_one_out(valid, combine):
            best = (-np.inf, "")
            for f, w, b in reached:
                rise = (f - w if np.isfinite(f) else np.inf) if np.isfinite(w) else -np.inf
                if rise > best[0]:
                    best = (float(rise), _name(b))
            out.append(best)
        return out

    def at_or_above(self, full: list[float], without: list[float], own: dict,
                    budgets: list[dict | None] | None = None) -> list[tuple[float, float, dict | None]]:
        """(loss with, loss without, budget) at each of ``budgets`` (default: the run's; ``full`` and ``without``
        are losses there) at or above the client's ``own``: its slots reach those budgets' models; a smaller
        budget can lose from any larger client's honest change to the shared slots."""
        (key, mine), = own.items()
        return [(f, w, b) for f, w, b in zip(full, without, self.budgets if budgets is None else budgets)
                if b is None or key not in b or b[key] >= mine]

    def rises(self, full: list[float], without: list[float], own: dict) -> list[tuple[float, dict | None]]:
        """Relative loss rise at each budget at or above the client's ``own``."""
        return [(_relative(f, w), b) for f, w, b in self.at_or_above(full, without, own)]


def _relative(with_: float, without: float) -> float:
    """Relative loss rise of including a client (inf where its inclusion breaks the model)."""
    return (with_ - without) / max(without, 1e-12) if np.isfinite(with_) else np.inf


def _size(budget: dict) -> float:
    """A budget's one value (a run's budgets share one unit: ratio, rank or params)."""
    return next(iter(budget.values()))


def _name(budget: dict | None) -> str:
    """A budget as the logs name it (``ratio0.5``), or the whole model."""
    return "the whole model" if budget is None else "_".join(f"{k}{v}" for k, v in budget.items())


class Rollback:
    """``fed.screen_rollback``: the global model before each of the last ``window`` rounds and the rounds each
    client's update was aggregated in, so that excluding a client can undo those rounds (its reversed or poisoned
    change stays in the shared slots otherwise: excluded in round 2, a reversed change at k = 1.4 from the top
    client had already taken the model to chance, and honest training from there collapsed one seed)."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.before: dict[int, State] = {}  # round -> the global model before it
        self.aggregated: dict[int, list[int]] = {}  # partition id -> rounds its update was aggregated in

    def remember(self, rnd: int, state: State) -> None:
        """Keep the model before round ``rnd`` (and those before the last ``window`` rounds, of the same shapes)."""
        shapes = {k: v.shape for k, v in state.items()}
        self.before = {r: s for r, s in self.before.items() if r >= rnd - self.window and
                       {k: v.shape for k, v in s.items()} == shapes}  # rank growth: no way back across it
        self.before[rnd] = dict(state)

    def aggregated_in(self, rnd: int, pids: list[int]) -> None:
        for p in pids:
            self.aggregated[p] = [r for r in self.aggregated.get(p, []) if r >= rnd - self.window] + [rnd]

    def tensors(self, state: State) -> dict[str, torch.Tensor]:
        """The remembered models of ``state``'s shapes as ``<round>/<name>`` tensors (a round checkpoint's
        ``rollback.safetensors``; ``state``: the global model it holds)."""
        shapes = {k: v.shape for k, v in state.items()}
        return {f"{r}/{k}": v for r, s in self.before.items() if {k: v.shape for k, v in s.items()} == shapes
                for k, v in s.items()}

    def load(self, aggregated: dict[str, list[int]], tensors: dict[str, torch.Tensor]) -> None:
        """Continue from a checkpoint's ``aggregated`` (strategy.json) and :meth:`tensors` (checked by the caller)."""
        self.aggregated = {int(p): [int(r) for r in rs] for p, rs in aggregated.items()}
        self.before = {}
        for name, t in tensors.items():
            r, k = name.split("/", 1)
            self.before.setdefault(int(r), {})[k] = t

    def point(self, pids: list[int]) -> int | None:
        """The earliest round, within reach, that aggregated an update of one of ``pids`` (None: nothing to undo)."""
        rounds = [r for p in pids for r in self.aggregated.get(p, []) if r in self.before]
        return min(rounds) if rounds else None


class Screen:
    """``fed.screen`` for one run: the server's sample (built at the first round that screens: it loads the run's
    data) and, with ``exclude``, the clients excluded so far (partition id -> round; kept in round checkpoints)."""

    def __init__(self, run: FederatedRun, method) -> None:
        self.run, self.method = run, method
        self.excluded: dict[int, int] = {}
        self.cusum: dict[int, float] = {}  # partition id -> one-sided cumulative rise (fed.screen_cusum)
        self._loo: LooScreen | None = None
        self._global: State | None = None
        f = run.fed
        on = f.screen == "exclude" and f.screen_rollback > 0 and f.server_opt == "none"  # moments: not rolled back
        self.rollback = Rollback(f.screen_rollback) if on else None

    def undo(self, newly: list[int]) -> tuple[int, State] | None:
        """With ``fed.screen_rollback``, after excluding ``newly``: (round, the global model before it) for the
        earliest round within reach that aggregated one of their updates; None where there is nothing to undo."""
        r0 = self.rollback.point(newly) if self.rollback is not None and newly else None
        return None if r0 is None else (r0, self.rollback.before[r0])

    def state(self) -> dict:
        """For round checkpoints (strategy.json): excluded clients, with a rollback the rounds it could undo, and the
        clients' cumulative rises (``fed.screen_cusum``)."""
        agg = self.rollback.aggregated if self.rollback is not None else {}
        return {"excluded": {str(p): r for p, r in self.excluded.items()},
                "aggregated": {str(p): rs for p, rs in agg.items()},
                "cusum": {str(p): c for p, c in self.cusum.items()}}

    def restore(self, st: dict) -> None:
        """Continue from a checked checkpoint: :meth:`state`'s fields and ``rollback`` (its models, read from
        ``rollback.safetensors`` by :mod:`.resume`)."""
        self.excluded = {int(p): int(r) for p, r in st.get("excluded", {}).items()}
        self.cusum = {int(p): float(c) for p, c in st.get("cusum", {}).items()}
        if self.rollback is not None:
            self.rollback.load(st.get("aggregated", {}), st.get("rollback", {}))

    def round(self, rnd: int, valid: list, combine: Callable[[list], State], state: State
              ) -> tuple[list, list[int], State | None]:
        """:meth:`apply`, then with ``fed.screen_rollback`` undo what a client excluded now contributed: (kept
        entries, partition ids rejected or set aside, the global model to go back to or None). After a rollback
        no entry is kept: the round's other replies trained from the model being undone."""
        if self.rollback is not None:
            self.rollback.remember(rnd, state)
        self._global = state  # what ``combine`` aggregates into (for the closed-form leave-one-out)
        before = set(self.excluded)
        kept, gone = self.apply(rnd, valid, combine)
        newly = [p for p in self.excluded if p not in before]
        back = self.undo(newly)
        if back is None:
            return kept, gone, None
        log.warning("round %d: client(s) %s had updates aggregated since round %d: the global model goes back to "
                    "its state before round %d, and this round's %d other repl(ies) are set aside (trained from the "
                    "model being undone; fed.screen_rollback=%d)", rnd, ", ".join(map(str, newly)), back[0], back[0],
                    len(kept), self.rollback.window)
        return [], gone + [v[0] for v in kept], back[1]

    def _without_each(self, valid: list) -> list[State] | None:
        """The round's aggregate without each entry of ``valid``, in closed form where the run aggregates with
        an averaging rule and no ``fed.robust`` rule (:meth:`.methods.FedMethod.without_each`), else None."""
        if self.run.fed.robust != "none" or self._global is None:
            return None
        return self.method.without_each(self._global, [v[1] for v in valid], [v[2] for v in valid])

    def aggregated(self, rnd: int, pids: list[int]) -> None:
        """Round ``rnd`` aggregated these partitions' updates (what a rollback would undo)."""
        if self.rollback is not None:
            self.rollback.aggregated_in(rnd, pids)

    def exclude(self, rnd: int, pid: int) -> None:
        """With ``exclude``: client ``pid`` sent a reply no honest client sends (:class:`.robust.HostileReply`)."""
        if self.run.fed.screen == "exclude" and pid >= 0 and pid not in self.excluded:
            self.excluded[pid] = rnd
            log.warning("round %d: client %d is excluded from the rest of the run (fed.screen=exclude)", rnd, pid)

    def apply(self, rnd: int, valid: list, combine: Callable[[list], State]) -> tuple[list, list[int]]:
        """(kept entries, partition ids rejected). ``exclude``: replies of excluded clients are dropped; then, worst
        first, a client whose inclusion raises the sample's loss by more than ``fed.screen_nats`` at its own or a
        larger budget (one a valid client holds) is rejected and excluded (among 3 valid replies: rejected for
        this round), and the rest judged again without it. ``loo``: every client above
        ``fed.screen_tolerance`` (relative) is rejected for this round."""
        mode = self.run.fed.screen
        if mode == "none" or not valid:
            return valid, []
        gone = [v[0] for v in valid if v[0] in self.excluded]
        if gone:
            log.warning("round %d: ignored the update(s) of client(s) %s, excluded earlier (fed.screen=exclude)", rnd,
                        ", ".join(f"{p} (in round {self.excluded[p]})" for p in gone))
        valid = [v for v in valid if v[0] not in self.excluded]
        if self._loo is None:
            self._loo = LooScreen(self.run, self.method, self._without_each)
        if mode == "loo":
            bad = self._loo.flagged(valid, combine)
            for i, (rise, at) in bad.items():
                log.warning("round %d: rejected update of client %d: including it raises the server sample's loss at "
                            "%s by %.0f %% (fed.screen=loo)", rnd, valid[i][0], at, 100 * rise)
            return [v for i, v in enumerate(valid) if i not in bad], gone + [valid[i][0] for i in bad]
        return self._exclude_worst(rnd, valid, combine, gone)

    def _accumulate(self, rnd: int, valid: list, combine: Callable[[list], State], gone: list[int]
                    ) -> tuple[list, list | None]:
        """``fed.screen_cusum``: add each client's rise to its one-sided cumulative sum (S = max(0, S + rise)); where
        factors are averaged slot by slot (every strategy but ``fedavg``) a rise counts in full only in rounds where
        its change points away from the others' (:mod:`.directions`: cosine below ``DISAGREE``), at most
        ``ALONG_CAP`` in other rounds (two honest clients that share slots can raise the loss together in one round).
        With at least ``MIN_EXCLUDE`` valid replies, a client whose sum passes the bound is rejected and excluded (a
        reversed change on a shared model rises a few hundredths of a nat a round and slows learning without ever
        crossing ``fed.screen_nats``). Returns (kept entries, the rises table of ``valid`` when it kept them all,
        else None)."""
        bound = self.run.fed.screen_cusum
        if bound is None or len(valid) < MIN_CLIENTS:
            return valid, None
        table = self._loo.table(valid, combine)
        for v, (rise, _), c in zip(valid, table, round_cosines(self.run.strategy, valid)):
            self.cusum[v[0]] = max(0.0, self.cusum.get(v[0], 0.0) + counted(rise, c)) if np.isfinite(rise) else 0.0
        over = [v[0] for v in valid if self.cusum[v[0]] > bound] if len(valid) >= MIN_EXCLUDE else []
        for pid in sorted(over, key=lambda p: -self.cusum[p])[:len(valid) - MIN_CLIENTS]:
            self.excluded[pid] = rnd
            gone.append(pid)
            log.warning("round %d: rejected the update of client %d and excluded it from the rest of the run: its "
                        "rises of the server sample's loss sum to %.3g nats (above fed.screen_cusum=%g)", rnd, pid,
                        self.cusum[pid], bound)
        kept = [v for v in valid if v[0] not in self.excluded]
        return kept, table if len(kept) == len(valid) else None

    def _exclude_worst(self, rnd: int, valid: list, combine: Callable[[list], State], gone: list[int]):
        """Worst first, a reply above ``fed.screen_nats`` is rejected: with at least ``MIN_EXCLUDE`` valid replies its
        sender is excluded; among 3, for this round only (two others are too few to exclude on). Before that, with
        ``fed.screen_cusum``, clients whose cumulative rises pass that bound (:meth:`_accumulate`)."""
        valid, table = self._accumulate(rnd, valid, combine, gone)
        while len(valid) >= MIN_CLIENTS:
            i, rise, at = self._loo.worst(valid, combine, table)
            table = None  # after a rejection the rest are judged again without it
            if not rise > self.run.fed.screen_nats:
                break
            judged = len(valid)
            pid = valid.pop(i)[0]
            gone.append(pid)
            why = (f"including it raises the loss of the server's sample at {at} by {rise:.3g} nats (above "
                   f"fed.screen_nats={self.run.fed.screen_nats:g})")
            if judged >= MIN_EXCLUDE:
                self.excluded[pid] = rnd
                log.warning("round %d: rejected the update of client %d and excluded it from the rest of the run: %s",
                            rnd, pid, why)
            else:
                log.warning("round %d: rejected the update of client %d for this round (%d valid replies, too few to "
                            "exclude on): %s", rnd, pid, judged, why)
        return valid, gone

    def retire(self, state: State) -> State | None:
        """After exclusions, with budget views (``slice``, ``product``): the global model cut to the largest budget a
        client still in the run holds, zero-padded to its shape, when that budget is below the run's largest (None
        otherwise). Slots only excluded clients trained carry only their information: the full model becomes the
        largest remaining budget's model, and nobody trains those slots again."""
        if not self.excluded or not self.method.budget_views() or self.run.strategy not in ("slice", "product"):
            return None
        f = self.run.fed
        left = [f.budget(p) for p in range(f.num_clients) if p not in self.excluded]
        top = max((f.budget(p) for p in range(f.num_clients)), key=_size)
        keep = max(left, key=_size) if left else None
        if keep is None or _size(keep) >= _size(top):
            return None
        view = self.method.view(state, keep)
        out = {}
        for k, t in state.items():
            if view[k].shape == t.shape:
                out[k] = view[k]
                continue
            out[k] = torch.zeros_like(t)
            out[k][tuple(slice(0, n) for n in view[k].shape)] = view[k]
        return out
