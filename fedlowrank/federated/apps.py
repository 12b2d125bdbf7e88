"""The Flower ServerApp and ClientApp, built by the library. ``server/server_app.py`` and
``clients/client_app.py`` only expose :func:`server_app` / :func:`client_app` as module-level ``app`` objects
for ``flwr run``; the in-process runtime builds them with :func:`make_server_app` / :func:`make_client_app`
(config via closure). Nothing under ``fedlowrank/`` imports those shims."""
from __future__ import annotations

from collections.abc import Callable

from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedlowrank.config import FederatedRun
from fedlowrank.runtime.logs import log_to_stderr, quiet_engine_tracebacks

from .client import local_train
from .run_config import node_cache_dir, run_from_run_config
from .server import run_server


def make_server_app(run: FederatedRun, results: dict | None = None) -> ServerApp:
    """A ServerApp running ``run``; its summary, or ``{"error": ...}``, goes into ``results``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        quiet_engine_tracebacks()
        try:
            summary = run_server(grid, run)
        except Exception as e:  # the simulation engine only logs ServerApp errors: hand the cause back
            if results is not None:
                results["error"] = f"{type(e).__name__}: {e}"
            raise
        if results is not None:
            results.update(summary)

    return app


def server_app() -> ServerApp:
    """The ServerApp of ``flwr run``: its config comes from the Flower run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        quiet_engine_tracebacks()
        log_to_stderr()  # Flower streams this process's stderr to `flwr run --stream` (and main.py's log)
        run_server(grid, _run_of(context))

    return app


def train_reply(msg: Message, result: tuple[dict, dict] | Exception) -> Message:
    """The reply to train message ``msg``: the client's (state, metrics), or an error reply for the exception that
    stopped it (as Flower's simulation answers a failing ClientApp)."""
    if isinstance(result, Exception):
        return Message(Error(code=1, reason=repr(result)), reply_to=msg)
    return Message(RecordDict({"arrays": ArrayRecord.from_torch_state_dict(result[0]),
                               "metrics": MetricRecord(result[1])}), reply_to=msg)


def _partition(msg: Message, run: FederatedRun) -> int:
    """The partition id the server assigned in this message (never the node's own claim)."""
    pid = msg.content["config"]["partition-id"]
    if isinstance(pid, bool) or not isinstance(pid, int) or not 0 <= pid < run.fed.num_clients:
        raise ValueError(f"server sent partition id {pid!r} outside 0..{run.fed.num_clients - 1}")
    return pid


def register(app: ClientApp, get_run: Callable[[Context], FederatedRun]) -> ClientApp:
    """Add the local training handler to ``app``."""

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        import torch

        run = get_run(context)
        torch.set_num_threads(max(1, int(run.fed.client_cpus)))
        pid = _partition(msg, run)
        state = msg.content["arrays"].to_torch_state_dict()
        rnd = int(msg.content["config"]["server-round"])
        return train_reply(msg, local_train(run, pid, run.fed.num_clients, state, rnd))

    return app


def train_messages_batched(run: FederatedRun, msgs: list[Message]) -> list[Message]:
    """The replies to a round's train messages, the clients trained together (``fed.batched_clients``,
    :mod:`.batched`: one vectorized computation per group of models that differ only in rank); a failing client
    gets an error reply, as from the ClientApp."""
    from .batched import train_group

    jobs = [(_partition(msg, run), msg.content["arrays"].to_torch_state_dict(),
             int(msg.content["config"]["server-round"])) for msg in msgs]
    return [train_reply(msg, res) for msg, res in zip(msgs, train_group(run, jobs, run.fed.num_clients))]


def make_client_app(run: FederatedRun) -> ClientApp:
    return register(ClientApp(), lambda context: run)


def client_app() -> ClientApp:
    """The ClientApp of ``flwr run``: its config comes from the Flower run config."""
    return register(ClientApp(), _run_of)


def _run_of(context: Context) -> FederatedRun:
    """The run of a ``flwr run`` message; on a deployed node with a cache directory (``FEDLOWRANK_CACHE_DIR``)
    the composed config comes from its cache (:mod:`fedlowrank.deploy.cache`), which simulations never use."""
    if node_cache_dir() is None:
        return run_from_run_config(context.run_config)
    from fedlowrank.deploy.cache import cached_compose

    return run_from_run_config(context.run_config, cached_compose)
