"""A Ray-free, in-process federated loop: the same strategy and client code as the Flower apps,
with a stand-in Grid whose nodes answer by calling the library's client functions directly.
Deterministic and fast: for tests, sweeps and benchmarks (``benchmarks/bench_fed_quality.py``)."""
from __future__ import annotations

from flwr.app import Message

from fedlowrank.config import FederatedRun

from fedlowrank.federated.apps import train_reply
from fedlowrank.federated.client import local_train


def ensure_identity() -> None:
    """Flower Messages need a task identity, which a SuperNode/SuperExec sets; give one here."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("run_id", "node_id", "task_id"):
        if getattr(TaskIdentity, f"_{name}") is None:
            setattr(TaskIdentity, name, 1 if name != "node_id" else 0)


class InProcessGrid:
    """Nodes ``100 .. 100 + n - 1``; each trains the partition the server's message names, as the ClientApp does."""

    def __init__(self, run: FederatedRun) -> None:
        ensure_identity()
        self.run = run
        self.nodes = [100 + i for i in range(run.fed.num_clients)]

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def _answer(self, msg: Message) -> Message:
        try:
            pid = int(msg.content["config"]["partition-id"])
            state = msg.content["arrays"].to_torch_state_dict()
            result = local_train(self.run, pid, self.run.fed.num_clients, state,
                                 int(msg.content["config"]["server-round"]))
        except Exception as e:  # noqa: BLE001 - as in Flower: a failing client job becomes an error reply
            result = e
        return train_reply(msg, result)

    def send_and_receive(self, msgs, timeout: float | None = None) -> list[Message]:
        """Each message's reply; a client with the ``duplicate`` fault has its reply delivered twice."""
        faults, out = self.run.fed.fault_map(), []
        for m in msgs:
            reply = self._answer(m)
            out += [reply, reply] if faults.get(int(m.content["config"]["partition-id"])) == "duplicate" else [reply]
        return out


def run_rounds(strategy, grid: InProcessGrid, rounds: int) -> None:
    """Train ``rounds`` rounds with ``strategy`` (a HeteroRankStrategy) on ``grid``."""
    for rnd in range(1, rounds + 1):
        replies = grid.send_and_receive(list(strategy.configure_train(rnd, None, None, grid)))
        strategy.aggregate_train(rnd, replies)


def make_strategy(run: FederatedRun):
    """The apps' strategy for ``run``, starting from the method's initial global model."""
    from fedlowrank.federated.methods import fed_method
    from fedlowrank.federated.server import partition_sizes
    from fedlowrank.federated.strategy import HeteroRankStrategy

    method = fed_method(run)
    return HeteroRankStrategy(run, method, method.initial_state(), sizes=partition_sizes(run))
