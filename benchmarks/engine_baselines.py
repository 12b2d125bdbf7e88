"""The two baselines of ``bench_fed_engine.py``, written from public APIs only (no fedlowrank import):

* ``flower``: a plain Flower 1.41 simulation, ``FedAvg`` from ``flwr.serverapp.strategy`` with central
  evaluation and a PyTorch ``ClientApp``, on ``flwr.simulation.run_simulation`` (Ray);
* ``loop``: a plain PyTorch FedAvg loop in one process.

Both read the task the benchmark exported (``spec.json`` + ``data.safetensors``: every client's training
tensors, the test set, the initial weights, the hyperparameters) and train as the project's clients do: the
same MLP, ``torch.manual_seed(seed·100003 + round·1009 + partition)`` before the model is built, a shuffled
DataLoader, SGD with momentum, examples-weighted averaging. Each writes ``rounds.jsonl`` (one line per round:
the unix time its training started, the global accuracy after it) into the spec's directory.

    python benchmarks/engine_baselines.py flower|loop <spec dir>
"""
from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class MLP(nn.Module):
    """Flatten, then Linear-ReLU-Dropout(0) per hidden layer, then a linear head (the project's names)."""

    def __init__(self, sizes: list[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(sizes[:-2], sizes[1:-1]):
            layers += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(0.0)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(sizes[-2], sizes[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Task:
    """The exported task: spec, tensors, and the layer sizes of the MLP."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.spec = json.loads((root / "spec.json").read_text())
        self.t = load_file(str(root / "data.safetensors"))
        self.init = {k[5:]: v for k, v in self.t.items() if k.startswith("init.")}
        self.sizes = self.spec["sizes"]

    def train(self, pid: int, state: dict[str, torch.Tensor], rnd: int) -> tuple[dict[str, torch.Tensor], int]:
        """One client's local training from ``state``; returns its new weights and its example count."""
        s = self.spec
        torch.manual_seed(s["seed"] * 100_003 + rnd * 1009 + pid)
        model = MLP(self.sizes)
        model.load_state_dict(state)
        ds = TensorDataset(self.t[f"x.{pid}"], self.t[f"y.{pid}"])
        opt = torch.optim.SGD(model.parameters(), lr=s["lr"], momentum=s["momentum"])
        model.train()
        for _ in range(s["epochs"]):
            for x, y in DataLoader(ds, batch_size=s["batch_size"], shuffle=True):
                loss = F.cross_entropy(model(x).float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}, len(ds)

    def accuracy(self, state: dict[str, torch.Tensor]) -> float:
        model = MLP(self.sizes)
        model.load_state_dict(state)
        model.eval()
        with torch.no_grad():
            pred = model(self.t["x.test"]).argmax(-1)
        return float((pred == self.t["y.test"]).float().mean())

    def log(self, name: str, rnd: int, acc: float) -> None:
        """Round ``rnd`` ended with accuracy ``acc``; round ``rnd + 1``'s training starts now."""
        with open(self.root / f"{name}_rounds.jsonl", "a") as f:
            f.write(json.dumps({"round": rnd, "accuracy": acc, "next_started_at": time.time()}) + "\n")


def plain_loop(task: Task) -> None:
    s = task.spec
    torch.set_num_threads(1)
    state, rng = dict(task.init), random.Random(s["seed"])
    task.log("loop", 0, task.accuracy(state))
    for rnd in range(1, s["rounds"] + 1):
        sampled = sorted(rng.sample(range(s["num_clients"]), s["per_round"]))
        replies = [task.train(pid, state, rnd) for pid in sampled]
        total = sum(n for _, n in replies)
        state = {k: sum(w[k] * (n / total) for w, n in replies) for k in state}
        task.log("loop", rnd, task.accuracy(state))


def plain_flower(task: Task) -> None:
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    s = task.spec
    client, server = ClientApp(), ServerApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        rnd = int(msg.content["config"]["server-round"])
        new, n = task.train(pid, msg.content["arrays"].to_torch_state_dict(), rnd)
        return Message(RecordDict({"arrays": ArrayRecord(new), "metrics": MetricRecord({"num-examples": n})}),
                       reply_to=msg)

    def evaluate(rnd: int, arrays: ArrayRecord) -> MetricRecord:
        acc = task.accuracy(arrays.to_torch_state_dict())
        task.log("flower", rnd, acc)
        return MetricRecord({"accuracy": acc})

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(fraction_train=s["per_round"] / s["num_clients"], fraction_evaluate=0.0,
                          min_train_nodes=s["per_round"], min_available_nodes=s["num_clients"])
        strategy.start(grid, ArrayRecord(dict(task.init)), num_rounds=s["rounds"], evaluate_fn=evaluate)

    run_simulation(server_app=server, client_app=client, num_supernodes=s["num_clients"],
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})


if __name__ == "__main__":
    which, root = sys.argv[1], Path(sys.argv[2])
    {"flower": plain_flower, "loop": plain_loop}[which](Task(root))
