"""In-process stand-in for a Flower Grid (no Ray): nodes answer with the library's client code,
so strategy behaviour can be tested quickly and deterministically."""
from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedlowrank.config import FederatedRun
from fedlowrank.federated.client import local_train

TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # Messages need an identity


class FakeGrid:
    def __init__(self, run: FederatedRun, budget_override: dict[int, dict] | None = None) -> None:
        self.run, self.override = run, budget_override or {}
        self.nodes = {100 + pid: pid for pid in range(run.fed.num_clients)}

    def get_node_ids(self):
        return list(self.nodes)

    def _answer(self, msg: Message) -> Message:
        pid = self.nodes[msg.metadata.dst_node_id]
        try:
            if msg.metadata.message_type == MessageType.QUERY:
                budget = self.override.get(pid, {"partition_id": pid, **self.run.fed.budget(pid)})
                return Message(RecordDict({"budget": ConfigRecord(budget)}), reply_to=msg)
            state = msg.content["arrays"].to_torch_state_dict()
            new, metrics = local_train(self.run, pid, self.run.fed.num_clients, state,
                                       int(msg.content["config"]["server-round"]))
            return Message(RecordDict({"arrays": ArrayRecord.from_torch_state_dict(new),
                                       "metrics": MetricRecord(metrics)}), reply_to=msg)
        except Exception as e:  # like Flower: a failing client job becomes an error reply
            return Message(Error(code=1, reason=repr(e)), reply_to=msg)

    def send_and_receive(self, msgs, timeout=None):
        return [self._answer(m) for m in msgs]


def run_rounds(strategy, grid: FakeGrid, rounds: int) -> None:
    for rnd in range(1, rounds + 1):
        replies = grid.send_and_receive(list(strategy.configure_train(rnd, None, None, grid)))
        strategy.aggregate_train(rnd, replies)
