"""One Flower strategy for heterogeneous-rank aggregation (fedlmt | slice | product).

The server assigns each connected node a partition id (its budget is the one the server's config gives that
partition; nodes are never asked); every round it sends each sampled node its partition id and the global model
cut to that budget,
validates the replies (keys, shapes, finiteness), aggregates the valid ones with the
configured rule, and logs per-client loss/rank and bytes to TensorBoard.
"""
from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedlowrank.config import FederatedRun
from fedlowrank.federated.aggregation import State, layer_ranks, validate_update
from fedlowrank.federated.methods import FedMethod
from fedlowrank.federated.report import budget_groups
from fedlowrank.federated.screening import Screen
from fedlowrank.federated.simclock import SimClock
from fedlowrank.federated.tb import RunWriters
from fedlowrank.federated.clipping import clip_update
from fedlowrank.federated.robust import (HostileReply, RejectedReply, bounded_weight, check_metrics, check_record,
                                         check_values, krum, record_bytes, robust_aggregate,
                                         value_bounds)
from fedlowrank.lowrank import state_bytes

log = logging.getLogger(__name__)


class NoValidUpdates(RuntimeError):
    """Too many rounds in a row without a single valid client update."""


def to_wire(t: torch.Tensor) -> torch.Tensor:
    """A tensor as it is sent: float32 (ArrayRecord rejects bf16), on the CPU."""
    return (t.float() if t.is_floating_point() else t).cpu()


def to_record(state: State) -> ArrayRecord:
    """ArrayRecord of float32 (ArrayRecord rejects bf16) CPU tensors."""
    return ArrayRecord.from_torch_state_dict({k: to_wire(v) for k, v in state.items()})


def from_record(record: ArrayRecord) -> State:
    return {k: v.clone() for k, v in record.to_torch_state_dict().items()}


class HeteroRankStrategy(Strategy):
    """Aggregates factorized models trained at different ranks. Tensors are matched by key.

    Nothing a client reports is trusted: partition ids and budgets are the server's, weights are
    capped by the partition sizes the server computed itself (``sizes``) and ``fed.max_weight``,
    and any malformed reply is rejected and logged. ``round_offset`` continues a resumed run.
    """

    def __init__(self, run: FederatedRun, method: FedMethod, global_state: State, writer: RunWriters | None = None,
                 on_round_end: Callable[[int, State, dict], None] | None = None, sizes: list[int] | None = None,
                 round_offset: int = 0) -> None:
        self.run, self.rule, self.method = run, run.strategy, method
        self.global_state = global_state
        self.writer = writer
        self.on_round_end = on_round_end
        self.sizes = sizes
        self.round_offset = round_offset
        self.budgets: dict[int, dict[str, float | int]] = {}  # node_id -> budget
        self.partition: dict[int, int] = {}  # node_id -> partition id
        self.sent: dict[int, State] = {}  # node_id -> the view it downloaded this round
        self.expected: dict[int, dict[str, tuple[int, ...]]] = {}  # node_id -> expected reply shapes
        self.rng = random.Random(run.seed)
        self.history: list[dict] = []
        self.rejections: list[tuple[int, int]] = []  # (round, partition id) of each rejected reply, this process
        self.screen = Screen(run, method)  # fed.screen: the server's sample, clients excluded so far
        self.failed_rounds = 0  # consecutive rounds without a valid update
        self.rolled_back = 0  # the last round whose screen rolled the global model back (fed.screen_rollback)
        self.resumed_budgets: dict[int, dict] = {}  # partition id -> budget saved in the round checkpoint
        self.clock = SimClock(run, sizes)  # simulated device time (inactive without fed.devices)
        self.server_opt = run.fed.server_optimizer(product_space=run.strategy == "product")
        self._round_start, self._round_down = time.perf_counter(), 0  # set again by every configure_train
        self._round_started_at = time.time()  # wall clock (unix seconds) of the round's start, for rounds.jsonl

    # ----------------------------------------------------------------- resume
    def state(self) -> dict:
        """JSON-able strategy state (sampling RNG, failure streak); the round is the caller's."""
        v, internal, gauss = self.rng.getstate()
        return {"rng": [v, list(internal), gauss], "failed_rounds": self.failed_rounds,
                "budgets": {str(self.partition[n]): b for n, b in self.budgets.items()},
                "sim_time_s": self.clock.elapsed, **self.screen.state()}

    def restore(self, st: dict, history: list[dict]) -> None:
        v, internal, gauss = st["rng"]
        self.rng.setstate((v, tuple(internal), gauss))
        self.failed_rounds = int(st["failed_rounds"])
        self.history = list(history)
        self.resumed_budgets = {int(p): b for p, b in st.get("budgets", {}).items()}
        self.clock.elapsed = float(st.get("sim_time_s", 0.0))
        self.screen.restore(st)
        if self.server_opt is not None:
            self.server_opt.load(st.get("server_opt", {}))

    # ----------------------------------------------------------------- discovery
    def _wait_for_nodes(self, grid: Grid) -> list[int]:
        need, deadline = self.run.fed.num_clients, time.time() + self.run.fed.timeout
        while len(nodes := list(grid.get_node_ids())) < need:
            if time.time() > deadline:
                raise TimeoutError(f"only {len(nodes)} of {need} nodes connected within {self.run.fed.timeout}s")
            time.sleep(0.5)
        return nodes

    def _assign(self, grid: Grid) -> None:
        """Give every connected node without a partition the lowest free partition id; its budget is the one the
        server's config gives that partition. Nodes are never asked: an id or budget is never a client's claim,
        so no node can take another's partition or a larger budget, and start-up sends no query round."""
        nodes = sorted(self._wait_for_nodes(grid))
        here = set(nodes)
        for gone in [n for n in self.partition if n not in here]:  # a node that left frees its partition
            del self.partition[gone], self.budgets[gone]
        free = sorted(set(range(self.run.fed.num_clients)) - set(self.partition.values()))
        new = [n for n in nodes if n not in self.partition]
        for node, pid in zip(new, free):
            self.partition[node], self.budgets[node] = pid, self.run.fed.budget(pid)
            if pid in self.resumed_budgets and self.method.keeps_budget(self.budgets[node], self.resumed_budgets[pid]):
                self.budgets[node] = self.resumed_budgets[pid]  # a smaller budget the client chose (HetLoRA)
            elif pid in self.resumed_budgets and self.resumed_budgets[pid] != self.budgets[node]:
                log.warning("client %d now has budget %s; before the resume it had %s", pid, self.budgets[node],
                            self.resumed_budgets[pid])
        if len(new) > len(free):
            log.warning("%d node(s) beyond fed.num_clients=%d get no partition", len(new) - len(free),
                        self.run.fed.num_clients)
        if new:
            log.info("partitions assigned to %d node(s); partitions by budget: %s", min(len(new), len(free)),
                     budget_groups({self.partition[n]: self.budgets[n] for n in new if n in self.partition}))

    # ----------------------------------------------------------------- train
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        rnd = server_round + self.round_offset
        self._assign(grid)
        by_pid = {self.partition[n]: n for n in self.budgets}
        # sample partition ids, not node ids: the same clients on every run and resume; excluded ones never again
        pids = sorted(p for p in by_pid if p not in self.screen.excluded)
        k = max(1, math.ceil(self.run.fed.fraction_train * len(pids))) if pids else 0
        sampled = sorted(self.rng.sample(pids, k))
        self.sent, self.expected, self._round_down = {}, {}, 0
        self._round_start, self._round_started_at = time.perf_counter(), time.time()
        msgs, views = [], {}  # one view (and its serialized record) per budget: clients of a budget share it
        for pid in sampled:
            node, budget = by_pid[pid], self.budgets[by_pid[pid]]
            key = tuple(sorted(budget.items()))
            if key not in views:
                view = self.method.view(self.global_state, budget)
                views[key] = (view, self.method.expected(view, budget), to_record(view))
            view, self.expected[node], record = views[key]
            self.sent[node] = view
            self._round_down += state_bytes(view)
            cfg = ConfigRecord({"server-round": rnd, "partition-id": pid})
            msgs.append(Message(RecordDict({"arrays": record, "config": cfg}), dst_node_id=node,
                                message_type=MessageType.TRAIN))
        log.debug("round %d: sent models to %d/%d clients (%d bytes)", rnd, len(msgs), len(pids), self._round_down)
        return msgs

    def _check_reply(self, reply: Message) -> tuple[State, dict[str, float], float]:
        """(update, metrics, weight) of a reply the server will aggregate, else :class:`RejectedReply`."""
        node = reply.metadata.src_node_id
        if node not in self.sent:
            raise RejectedReply("reply from a node that was not sent a model this round")
        f = self.run.fed
        sent = self.sent[node]
        try:
            record = reply.content["arrays"]
            expected = self.method.match_expected(self.expected.get(node, {}),
                                                  {k: tuple(record[k].shape) for k in record.keys()})
            check_record(record, expected, {k: to_wire(v).dtype for k, v in sent.items()}, f.max_reply_mb * 2**20)
            state = from_record(record)
            metrics = dict(reply.content["metrics"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            if isinstance(e, RejectedReply):
                raise
            raise RejectedReply(f"malformed reply ({e})") from e
        reason = validate_update(state, expected)
        if reason is not None:
            raise RejectedReply(reason)
        check_values(state, {k: v.dtype for k, v in sent.items()}, f.max_abs_value,
                     value_bounds(sent, f.max_abs_value, f.max_abs_ratio))
        metrics = check_metrics(metrics, f.max_abs_value, self.partition[node])
        known = self.sizes[self.partition[node]] if self.sizes is not None else None
        weight = bounded_weight(metrics["num-examples"], known, f.max_weight)
        if f.clip_norm is not None:
            state, norm = clip_update(sent, state, f.clip_norm)
            metrics["update_norm"] = norm
        budget = self.method.next_budget(self.budgets[node], state)
        if budget != self.budgets[node]:  # e.g. HetLoRA's rank self-pruning: the client keeps the smaller rank
            log.info("client %d pruned its adapters: budget %s from now on", self.partition[node], budget)
            self.budgets[node] = budget
        return state, metrics, weight

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check every reply, drop stragglers past the simulated deadline, aggregate the valid updates into
        the global model (kept when the result is not finite), log the round and stop after
        ``fed.max_failed_rounds`` rounds in a row without a valid update. An accepted reply's ``arrays`` are
        released once read (the round then holds each update once: memory at scale)."""
        rnd = server_round + self.round_offset
        valid, failures, rejected, up = self._collect(rnd, replies)
        valid = self._clip_auto(rnd, valid)
        valid, screened = self._screen(rnd, valid)
        rejected += screened
        valid, sim = self._drop_stragglers(rnd, valid)
        if valid and not self._aggregate(rnd, valid):
            rejected += len(valid)
            valid = []
        if valid:
            self.screen.aggregated(rnd, [v[0] for v in valid])
        self.failed_rounds = 0 if valid or self.rolled_back == rnd else self.failed_rounds + 1
        if not valid and self.rolled_back != rnd:
            log.warning("round %d: no valid update (%d failed, %d rejected); global model unchanged (%d round(s) "
                        "in a row)", rnd, failures, rejected, self.failed_rounds)
        weights, per_client = [v[2] for v in valid], [v[3] for v in valid]
        tot = sum(weights) or 1.0
        summary = {
            "round": rnd, "clients_ok": len(valid), "failures": failures, "rejected": rejected,
            "round_s": time.perf_counter() - self._round_start, "started_at": self._round_started_at,
            "upload_bytes": up, "download_bytes": self._round_down, **sim,
            "global_rank_sum": sum(layer_ranks(self.global_state).values()),
            "train_loss": sum(w * c["train_loss"] for w, c in zip(weights, per_client)) / tot if valid else float("nan"),
        }
        self._log_round(rnd, summary, per_client)
        self.history.append({**summary, "clients": per_client})
        if self.on_round_end is not None:
            self.on_round_end(rnd, self.global_state, summary)
        if self.failed_rounds >= self.run.fed.max_failed_rounds:
            raise NoValidUpdates(f"{self.failed_rounds} rounds in a row (up to round {rnd}) without a valid client "
                                 f"update ({failures} failed, {rejected} rejected in the last); stopping. See the "
                                 "warnings above for each client's reason.")
        mr = MetricRecord({k: float(v) for k, v in summary.items() if k != "round"})
        return to_record(self.global_state), mr

    def _collect(self, rnd: int, replies: Iterable[Message]) -> tuple[list[tuple], int, int, int]:
        """(valid, failures, rejected, uploaded bytes): valid holds (pid, update, weight, metrics, view)
        sorted by partition id, so sums are bit-reproducible whatever the arrival order."""
        valid, failures, rejected, up = [], 0, 0, 0
        answered: dict[int, int] = {}  # node -> bytes of its first reply
        for reply in replies:
            node = reply.metadata.src_node_id
            pid = self.partition.get(node, -1)
            if node in answered:  # one reply per sender per round: a replayed or second reply is never counted
                rejected += 1
                self.rejections.append((rnd, pid))
                up += self._sent_bytes(reply) or answered[node]  # the very same message: its arrays were released
                log.warning("round %d: rejected a second reply from client %d (node %d) in the same round", rnd, pid,
                            node)
                continue
            answered[node] = 0
            if reply.has_error():
                failures += 1
                self._log_failure(rnd, pid, reply.error.reason)
                continue
            try:
                state, metrics, weight = self._check_reply(reply)
                answered[node] = state_bytes(state)
                up += answered[node]  # payload bytes, as for downloads
                del reply.content["arrays"]  # the serialized copy: the round holds each update once (memory)
            except Exception as e:  # anything a client sends must not stop the server
                up += self._sent_bytes(reply)
                rejected += 1
                self.rejections.append((rnd, pid))
                log.warning("round %d: rejected update of client %d: %s", rnd, pid, e)
                if isinstance(e, HostileReply):  # fed.screen=exclude: its sender is out for the rest of the run
                    self.screen.exclude(rnd, pid)
                continue
            valid.append((pid, state, weight, {**metrics, "pid": pid, "weight": weight},
                          self.sent[reply.metadata.src_node_id]))
        valid.sort(key=lambda v: v[0])
        return valid, failures, rejected, up

    @staticmethod
    def _sent_bytes(reply: Message) -> int:
        """Serialized bytes of a rejected reply's arrays (0 when it has none that can be read)."""
        try:
            return record_bytes(reply.content["arrays"])
        except Exception:  # noqa: BLE001 - only for the byte count
            return 0

    def _clip_auto(self, rnd: int, valid: list[tuple]) -> list[tuple]:
        """``fed.clip_auto``: clip changes far above the round's median, group by group, and cap rank slots that
        fewer than 3 clients trained (see :mod:`fedlowrank.federated.clipping`)."""
        factor = self.run.fed.clip_auto
        if factor is None or not valid:
            return valid
        updates, scaled, capped = self.method.clip_auto([(v[4], v[1]) for v in valid], factor)
        out = []
        hit = [f"client {v[0]} ({x:.3g}x)" for v, x in zip(valid, scaled) if x is not None]
        if hit or any(capped):  # one line a round, with counts: clipping is routine, not something to act on
            log.info("round %d: clipping scaled %d of %d changes to %gx the median%s%s", rnd, len(hit), len(valid),
                     factor, f": {', '.join(hit)}" if hit else "",
                     f"; capped {sum(capped)} thinly trained slot group(s)" if any(capped) else "")
        for v, u, x, c in zip(valid, updates, scaled, capped):
            if x is not None or c:
                v = (v[0], u, v[2], {**v[3], "clipped_excess": x or 0.0, "clipped_slots": c}, v[4])
            out.append(v)
        return out

    def _drop_stragglers(self, rnd: int, valid: list[tuple]) -> tuple[list[tuple], dict]:
        """With a device model: each client's simulated time into its metrics, clients past the deadline
        dropped, and the round's simulated figures."""
        if not self.clock.active:
            return valid, {}
        secs, _, dropped, times = self.clock.round({v[0]: v[4] for v in valid}, {v[0]: v[1] for v in valid})
        for v in valid:
            v[3]["sim_time_s"] = times[v[0]]
        if dropped:
            log.info("round %d: %d straggler(s) past the %.1f s deadline dropped: %s", rnd, len(dropped),
                     self.clock.cfg.deadline_s, dropped)
        late = set(dropped)
        kept = [v for v in valid if v[0] not in late]
        return kept, {"sim_round_s": secs, "sim_time_s": self.clock.elapsed, "stragglers": len(dropped)}

    def _screen(self, rnd: int, valid: list[tuple]) -> tuple[list[tuple], int]:
        """``fed.screen`` (:mod:`fedlowrank.federated.screening`): (kept, number dropped)."""
        kept, gone, back = self.screen.round(rnd, valid, self._combine, self.global_state)
        self.rejections += [(rnd, pid) for pid in gone]
        if back is not None:  # fed.screen_rollback: an excluded client's earlier rounds undone
            self.global_state, self.rolled_back = back, rnd
        retired = self.screen.retire(self.global_state) if rnd in self.screen.excluded.values() else None
        if retired is not None:  # slots only excluded clients trained: the largest remaining budget's model
            log.warning("round %d: rank slots that only excluded clients trained are set to zero", rnd)
            self.global_state = retired
        return kept, len(gone)

    def _combine(self, valid: list[tuple]) -> State:
        """The aggregation rule (or ``fed.robust``) over ``valid``, before any server optimizer."""
        updates, weights, views = [v[1] for v in valid], [v[2] for v in valid], [v[4] for v in valid]
        if self.run.fed.robust == "krum":
            return krum(updates, self.run.fed.krum_f)
        if self.run.fed.robust != "none":
            return robust_aggregate(self.global_state, updates, self.rule, self.run.fed.robust, self.run.fed.trim_ratio)
        return self.method.aggregate(self.global_state, updates, weights, views)

    def _aggregate(self, rnd: int, valid: list[tuple]) -> bool:
        """Aggregate ``valid`` into the global model (then let the method adapt it); False, with the global
        model unchanged, when the result has non-finite values."""
        new = self._combine(valid)
        if self.server_opt is not None:  # FedAvgM / FedAdam / ... on the aggregated change
            new = self.server_opt.step(rnd, self.global_state, new)
        bad = [k for k, v in new.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:  # finite updates can still overflow when combined: never publish a broken model
            log.error("round %d: aggregated model has non-finite values in %s; keeping the previous global "
                      "model", rnd, bad[:3])
            return False
        self.global_state = self.method.adapt(new, rnd)  # rank-adaptive methods reshape it here
        return True

    def _log_failure(self, rnd: int, pid: int, reason: str) -> None:
        """One line in the log (the error's last line); the whole traceback goes to ``client_failures.log``."""
        lines = [ln for ln in str(reason).strip().splitlines() if ln.strip()] or ["(no reason given)"]
        path = Path(self.run.out_dir) / "client_failures.log"
        log.warning("round %d: client %d failed: %s (traceback in %s)", rnd, pid, lines[-1].strip()[:300], path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(f"=== round {rnd}, client {pid} ===\n{reason}\n")

    def _log_round(self, rnd: int, summary: dict, per_client: list[dict]) -> None:
        log.debug("round %d: %d ok, %d failed, %d rejected; up %d B, down %d B; train loss %.4f", rnd,
                 summary["clients_ok"], summary["failures"], summary["rejected"], summary["upload_bytes"],
                 summary["download_bytes"], summary["train_loss"])
        if self.writer is None:
            return
        w = self.writer.server
        for key in ("upload_bytes", "download_bytes", "failures", "rejected", "clients_ok", "train_loss",
                    "sim_round_s", "sim_time_s", "stragglers", "global_rank_sum"):
            if key in summary:
                w.add_scalar(f"round/{key}", summary[key], rnd)
        for p, r in layer_ranks(self.global_state).items():  # per-layer global rank (rank-adaptive runs move it)
            w.add_scalar(f"global_rank/{p}", r, rnd)
        w.flush()
        self.writer.log_clients(per_client, rnd)  # one TensorBoard run per client, shared tags

    # ----------------------------------------------------------------- evaluate (server-side only)
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log.info("HeteroRankStrategy(rule=%s, method=%s, clients=%d, rounds=%d, budgets=%s)", self.rule,
                 self.method.name, self.run.fed.num_clients, self.run.fed.rounds,
                 self.run.fed.ranks if self.run.fed.ranks is not None else self.run.fed.rank_ratios)


__all__ = ["HeteroRankStrategy", "NoValidUpdates", "from_record", "to_record"]
