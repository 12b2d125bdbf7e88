"""One Flower strategy for heterogeneous-rank aggregation (fedlmt | slice | product).

Each node first answers a ``query`` with its rank budget (devices know their own limits);
every round the server sends each sampled node the global model cut to that budget,
validates the replies (keys, shapes, finiteness), aggregates the valid ones with the
configured rule, and logs per-client loss/rank and bytes to TensorBoard.
"""
from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedlowrank.config import FederatedRun
from fedlowrank.federated.aggregation import State, validate_update
from fedlowrank.federated.methods import FedMethod
from fedlowrank.lowrank import state_bytes

log = logging.getLogger(__name__)


def to_record(state: State) -> ArrayRecord:
    """ArrayRecord of float32 (ArrayRecord rejects bf16) CPU tensors."""
    return ArrayRecord.from_torch_state_dict(
        {k: (v.float() if v.is_floating_point() else v).cpu() for k, v in state.items()})


def from_record(record: ArrayRecord) -> State:
    return {k: v.clone() for k, v in record.to_torch_state_dict().items()}


class HeteroRankStrategy(Strategy):
    """Aggregates factorized models trained at different ranks. Tensors are matched by key."""

    def __init__(self, run: FederatedRun, method: FedMethod, global_state: State, writer=None,
                 on_round_end: Callable[[int, State, dict], None] | None = None) -> None:
        self.run, self.rule, self.method = run, run.strategy, method
        self.global_state = global_state
        self.writer = writer
        self.on_round_end = on_round_end
        self.budgets: dict[int, dict[str, float | int]] = {}  # node_id -> budget
        self.partition: dict[int, int] = {}  # node_id -> partition id
        self.sent: dict[int, dict[str, tuple[int, ...]]] = {}  # node_id -> expected reply shapes
        self.rng = random.Random(run.seed)
        self.down_bytes = 0
        self.history: list[dict] = []

    # ----------------------------------------------------------------- discovery
    def _wait_for_nodes(self, grid: Grid) -> list[int]:
        need, deadline = self.run.fed.num_clients, time.time() + self.run.fed.timeout
        while len(nodes := list(grid.get_node_ids())) < need:
            if time.time() > deadline:
                raise TimeoutError(f"only {len(nodes)} of {need} nodes connected within {self.run.fed.timeout}s")
            time.sleep(0.5)
        return nodes

    def _discover(self, grid: Grid) -> None:
        """Ask nodes we do not know yet for their partition id and rank budget."""
        unknown = [n for n in self._wait_for_nodes(grid) if n not in self.budgets]
        if not unknown:
            return
        msgs = [Message(RecordDict({"config": ConfigRecord({"ask": "budget"})}), dst_node_id=n,
                        message_type=MessageType.QUERY) for n in unknown]
        for reply in grid.send_and_receive(msgs, timeout=self.run.fed.timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("budget query to node %d failed: %s", node, reply.error.reason)
                continue
            cfg = reply.content["budget"]
            self.partition[node] = int(cfg["partition_id"])
            self.budgets[node] = {"rank": int(cfg["rank"])} if "rank" in cfg else {"ratio": float(cfg["ratio"])}
        log.info("known client budgets: %s", {self.partition[n]: b for n, b in self.budgets.items()})

    # ----------------------------------------------------------------- train
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._discover(grid)
        nodes = sorted(self.budgets)
        k = max(1, math.ceil(self.run.fed.fraction_train * len(nodes)))
        sampled = sorted(self.rng.sample(nodes, k))
        self.sent, self._round_down = {}, 0
        msgs = []
        for node in sampled:
            view = self.method.view(self.global_state, self.budgets[node])
            self.sent[node] = self.method.expected(view, self.budgets[node])
            self._round_down += state_bytes(view)
            cfg = ConfigRecord({"server-round": server_round})
            msgs.append(Message(RecordDict({"arrays": to_record(view), "config": cfg}), dst_node_id=node,
                                message_type=MessageType.TRAIN))
        log.info("round %d: sent models to %d/%d clients (%d bytes)", server_round, len(msgs), len(nodes),
                 self._round_down)
        return msgs

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        updates, weights, failures, rejected, up = [], [], 0, 0, 0
        per_client: list[dict[str, float]] = []
        for reply in replies:
            node = reply.metadata.src_node_id
            pid = self.partition.get(node, -1)
            if reply.has_error():
                failures += 1
                log.warning("round %d: client %d failed: %s", server_round, pid, reply.error.reason)
                continue
            try:
                state = from_record(reply.content["arrays"])
                metrics = dict(reply.content["metrics"])
            except (KeyError, TypeError, ValueError) as e:
                rejected += 1
                log.warning("round %d: rejected client %d: malformed reply (%s)", server_round, pid, e)
                continue
            up += state_bytes(state)
            reason = validate_update(state, self.sent.get(node, {}))
            n = float(metrics.get("num-examples", 0.0))
            if reason is None and not (math.isfinite(n) and n > 0):
                reason = f"bad num-examples {n}"
            if reason is not None:
                rejected += 1
                log.warning("round %d: rejected update of client %d: %s", server_round, pid, reason)
                continue
            updates.append(state)
            weights.append(n)
            per_client.append({"pid": pid, **metrics})
        if updates:
            new = self.method.aggregate(self.global_state, updates, weights)
            bad = [k for k, v in new.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
            if bad:  # finite updates can still overflow when combined: never publish a broken model
                log.error("round %d: aggregated model has non-finite values in %s; keeping the previous global "
                          "model", server_round, bad[:3])
                rejected += len(updates)
                updates, weights, per_client = [], [], []
            else:
                self.global_state = new
        else:
            log.warning("round %d: no valid update; global model unchanged", server_round)
        tot = sum(weights) or 1.0
        summary = {
            "round": server_round, "clients_ok": len(updates), "failures": failures, "rejected": rejected,
            "upload_bytes": up, "download_bytes": self._round_down,
            "train_loss": sum(w * c["train_loss"] for w, c in zip(weights, per_client)) / tot if updates else float("nan"),
        }
        self._log_round(server_round, summary, per_client)
        self.history.append({**summary, "clients": per_client})
        if self.on_round_end is not None:
            self.on_round_end(server_round, self.global_state, summary)
        mr = MetricRecord({k: float(v) for k, v in summary.items() if k != "round"})
        return to_record(self.global_state), mr

    def _log_round(self, rnd: int, summary: dict, per_client: list[dict]) -> None:
        log.info("round %d: %d ok, %d failed, %d rejected; up %d B, down %d B; train loss %.4f", rnd,
                 summary["clients_ok"], summary["failures"], summary["rejected"], summary["upload_bytes"],
                 summary["download_bytes"], summary["train_loss"])
        if self.writer is None:
            return
        w = self.writer
        for key in ("upload_bytes", "download_bytes", "failures", "rejected", "clients_ok", "train_loss"):
            w.add_scalar(f"round/{key}", summary[key], rnd)
        for c in per_client:
            pid = int(c["pid"])
            w.add_scalar(f"client_{pid}/train_loss", c["train_loss"], rnd)
            w.add_scalar(f"client_{pid}/rank_sum", c["rank_sum"], rnd)
            w.add_scalar(f"client_{pid}/rank_ratio", c["rank_ratio"], rnd)
        w.flush()

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


__all__ = ["HeteroRankStrategy", "from_record", "to_record"]
