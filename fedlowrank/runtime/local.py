"""``fed.runtime=local``: the same ServerApp and ClientApp, their messages carried in this process.

No SuperLink, no Ray, no ports: the ServerApp's ``main`` runs on a :class:`LocalGrid` whose nodes hand each
message to the ClientApp object (the same ``@app.train`` handler Flower's runtimes call) and keep the reply
for the next pull. Clients run one after another, each with ``fed.client_cpus`` threads, in one process that
keeps the data, the partitions and the validated config between messages. Start-up is the imports and the
data; what a round costs is the clients' training, the aggregation and the evaluation.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from uuid import uuid4

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedlowrank.config import FederatedRun
from fedlowrank.federated.apps import train_reply

from .inprocess import ensure_identity

log = logging.getLogger(__name__)
FIRST_NODE = 1000  # node ids FIRST_NODE .. FIRST_NODE + num_clients - 1


class LocalGrid(Grid):
    """A Grid whose ``num_clients`` nodes answer in this process through ``client_app``.

    ``push_messages`` runs the ClientApp on every message at once (a raising handler becomes an error reply,
    as in Flower's simulation); ``pull_messages`` returns the replies not yet pulled. A client with the
    ``duplicate`` fault has its reply delivered twice, as a hostile node could send it.
    """

    def __init__(self, run: FederatedRun, client_app) -> None:
        ensure_identity()
        self.fr, self.app = run, client_app
        self.nodes = [FIRST_NODE + i for i in range(run.fed.num_clients)]
        self._run = Run.create_empty(run_id=1)
        self._replies: dict[str, list[Message]] = {}
        self._contexts: dict[int, Context] = {}
        self._dup = {FIRST_NODE + pid for pid, f in run.fed.fault_map().items() if f == "duplicate"}

    def set_run(self, run: Run) -> None:  # noqa: D102
        self._run = run

    @property
    def run(self) -> Run:  # noqa: D102
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:  # noqa: D102
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return list(self.nodes)

    def _context(self, node: int) -> Context:
        """One Context per node for the whole run (its state persists between messages, as on a SuperNode)."""
        if node not in self._contexts:
            self._contexts[node] = Context(run_id=self._run.run_id, node_id=node, node_config={},
                                           state=RecordDict(), run_config={})
        return self._contexts[node]

    def _answer(self, msg: Message) -> Message:
        """The ClientApp's reply; the handler sets torch's thread count for its client, which is put back
        for the server (whose aggregation then runs as it does beside Flower's simulation)."""
        import torch

        threads = torch.get_num_threads()
        try:
            return self.app(msg, self._context(msg.metadata.dst_node_id))
        except Exception as e:  # noqa: BLE001 - as Flower's simulation: a failing ClientApp is an error reply
            return train_reply(msg, e)
        finally:
            torch.set_num_threads(threads)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver every message to its node now (``fed.batched_clients``: a round's train messages together);
        returns their ids."""
        msgs = list(messages)
        for msg in msgs:
            if msg.metadata.dst_node_id not in self.nodes:
                raise ValueError(f"no node {msg.metadata.dst_node_id} in this local grid")
            msg.metadata.__dict__["_message_id"] = str(uuid4())
        if self.fr.fed.batched_clients and msgs and all(m.metadata.message_type == "train" for m in msgs):
            from fedlowrank.federated.apps import train_messages_batched

            replies = train_messages_batched(self.fr, msgs)
        else:
            replies = [self._answer(m) for m in msgs]
        for msg, reply in zip(msgs, replies):
            copies = 2 if msg.metadata.dst_node_id in self._dup else 1
            self._replies[msg.metadata.message_id] = [reply] * copies
        return [m.metadata.message_id for m in msgs]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies to ``message_ids`` not pulled before."""
        out: list[Message] = []
        for mid in message_ids:
            out += self._replies.pop(mid, [])
        return out

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Every reply at once: the nodes answered while the messages were pushed."""
        return list(self.pull_messages(list(self.push_messages(messages))))


def run_local(fr: FederatedRun) -> dict:
    """Run ``fr`` on the ServerApp and ClientApp of :mod:`fedlowrank.federated.apps` in this process."""
    from fedlowrank.federated.apps import make_client_app, make_server_app

    from .logs import quiet_flower

    quiet_flower()  # Flower's strategy tree and raw metric dumps: the project logs each round itself
    results: dict = {}
    grid = LocalGrid(fr, make_client_app(fr))
    t0 = time.perf_counter()
    server = make_server_app(fr, results)
    server(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    if "error" in results:
        raise RuntimeError(f"federated run failed: {results['error']} (logs in {fr.out_dir})")
    log.debug("local runtime: %.2f s", time.perf_counter() - t0)
    return results
