"""Flower ClientApp (thin): answers its rank budget, trains locally via library code."""
from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlowrank.config import FederatedRun
from fedlowrank.federated.client import local_train


def _ids(context: Context) -> tuple[int, int]:
    return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])


def register(app: ClientApp, get_run) -> ClientApp:
    @app.query()
    def query(msg: Message, context: Context) -> Message:
        pid, _ = _ids(context)
        budget = ConfigRecord({"partition_id": pid, **get_run(context).fed.budget(pid)})
        return Message(RecordDict({"budget": budget}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        import torch

        run = get_run(context)
        torch.set_num_threads(max(1, int(run.fed.client_cpus)))
        pid, n = _ids(context)
        state = msg.content["arrays"].to_torch_state_dict()
        rnd = int(msg.content["config"]["server-round"])
        new_state, metrics = local_train(run, pid, n, state, rnd)
        return Message(RecordDict({"arrays": ArrayRecord.from_torch_state_dict(new_state),
                                   "metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


def make_client_app(run: FederatedRun) -> ClientApp:
    return register(ClientApp(), lambda context: run)


def _run_from_context(context: Context) -> FederatedRun:
    from fedlowrank.federated.deploy import run_from_run_config

    return run_from_run_config(context.run_config)


app = register(ClientApp(), _run_from_context)
