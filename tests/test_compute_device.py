"""Federated clients and the server's evaluations compute on the run's device: ``fed.device`` (auto: CUDA when
``fed.client_gpus > 0`` and CUDA is present). On CPU the device is observed by handing the code the ``meta``
device: every parameter, batch and logit of local training, client evaluation and server evaluation lands there
(meta tensors hold no data, so each path is stopped at its first loss). A CUDA test skips without a GPU."""
from __future__ import annotations

import pytest
import torch

import fedlowrank.training.loop as loop
from fedlowrank.config import ConfigError
from fedlowrank.federated import client as client_mod

from helpers import fed_run as _run


class Stop(Exception):
    """Raised at the first loss: the devices seen so far are what the test checks."""


@pytest.fixture
def on_meta(monkeypatch):
    """compute_device() answers ``meta``; the first loss or evaluation sum records devices and stops."""
    import fedlowrank.federated.server as server_mod

    seen: dict[str, set[str]] = {"params": set(), "batch": set(), "logits": set()}
    for mod in (client_mod, server_mod):  # the server module bound the name at its import
        monkeypatch.setattr(mod, "compute_device", lambda run: torch.device("meta"))

    def record(logits, y):
        seen["logits"].add(logits.device.type)
        seen["batch"].add(y.device.type)
        raise Stop

    import fedlowrank.federated.report as report_mod

    monkeypatch.setattr(loop, "cross_entropy", record)
    monkeypatch.setattr(loop, "eval_sums", record)
    monkeypatch.setattr(report_mod, "example_sums", record)  # the clients' held-out evaluation, by budget
    real_forward = torch.nn.Module.__call__

    def forward(self, *a, **k):
        seen["params"].update(p.device.type for p in self.parameters())
        seen["batch"].update(x.device.type for x in a if isinstance(x, torch.Tensor))
        return real_forward(self, *a, **k)

    monkeypatch.setattr(torch.nn.Module, "__call__", forward)
    return seen


def test_local_training_puts_model_and_batches_on_the_runs_device(tmp_path, on_meta):
    from fedlowrank.federated.methods import fed_method

    run = _run(tmp_path, "fed.num_clients=4")
    with pytest.raises(Stop):
        client_mod.local_train(run, 3, 4, fed_method(run).initial_state(), 1)
    assert on_meta == {"params": {"meta"}, "batch": {"meta"}, "logits": {"meta"}}


def test_client_and_server_evaluations_run_on_the_runs_device(tmp_path, on_meta):
    from fedlowrank.federated.report import client_eval
    from fedlowrank.federated.server import _ServerRun
    from fedlowrank.federated.task import fed_data

    run = _run(tmp_path, "fed.num_clients=4")
    sr = _ServerRun(run)
    state = sr.strategy.global_state
    with pytest.raises(Stop):
        client_eval(run, sr.method, state, fed_data(run), [0, 3])
    with pytest.raises(Stop):
        sr._eval(state)
    assert on_meta == {"params": {"meta"}, "batch": {"meta"}, "logits": {"meta"}}


def test_the_device_rule(tmp_path, monkeypatch):
    from fedlowrank.federated.client import compute_device

    assert compute_device(_run(tmp_path, "fed.client_gpus=0.5")).type == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert compute_device(_run(tmp_path, "fed.client_gpus=0.25")).type == "cuda"  # a fraction: a shared GPU
    assert compute_device(_run(tmp_path)).type == "cpu"  # no GPU reserved: CPU, even where one exists
    assert compute_device(_run(tmp_path, "fed.device=cpu", "fed.client_gpus=1")).type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="fed.device=cuda"):
        compute_device(_run(tmp_path, "fed.device=cuda"))
    with pytest.raises(ConfigError, match="fed.device must be"):
        _run(tmp_path, "fed.device=tpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_client_trains_on_the_gpu_and_replies_on_the_cpu(tmp_path):
    from fedlowrank.federated.methods import fed_method

    losses = []
    for extra in (["fed.client_gpus=0.5", "fed.bf16=true"], ["fed.device=cpu"]):
        run = _run(tmp_path, "fed.num_clients=4", *extra)
        method = fed_method(run)
        state, metrics = client_mod.local_train(run, 3, 4, method.view(method.initial_state(), run.fed.budget(3)), 1)
        assert all(t.device.type == "cpu" for t in state.values()) and metrics["steps"] > 0
        losses.append(metrics["train_loss"])
    assert abs(losses[0] - losses[1]) < 0.05 * losses[1]  # bf16 on the GPU learns as fp32 on the CPU does


def test_bf16_local_training_follows_fp32(tmp_path):
    """bf16 autocast changes rounding, not the trajectory: one context held over many steps would keep using
    its cached bf16 copies of the first weights (the client then does not learn: replies 20-170 % away)."""
    from fedlowrank.federated.methods import fed_method

    replies = {}
    for name, extra in {"fp32": [], "bf16": ["fed.bf16=true"]}.items():
        run = _run(tmp_path / name, "fed.num_clients=4", "fed.device=cpu", *extra)
        method = fed_method(run)
        view = method.view(method.initial_state(), run.fed.budget(3))
        replies[name] = client_mod.local_train(run, 3, 4, view, 1)
    (a, ma), (b, mb) = replies["fp32"], replies["bf16"]
    assert ma["train_loss"] < 2.0 and abs(ma["train_loss"] - mb["train_loss"]) < 0.02 * ma["train_loss"]
    for k, t in a.items():
        assert float((t - b[k]).norm() / t.norm()) < 0.05, k


@pytest.mark.parametrize("strategy, builds", [("fedavg", 1), ("slice", 3)])
def test_client_eval_builds_one_model_per_budget_it_cuts_to(tmp_path, monkeypatch, strategy, builds):
    """Clients of 3 budgets: ``slice`` cuts the global model to each (3 models), ``fedavg`` gives every client the
    whole model (1 model, not one per budget); each row keeps its client's budget and equals that client alone."""
    from fedlowrank.federated.methods import fed_method
    from fedlowrank.federated.report import client_eval
    from fedlowrank.federated.task import fed_data

    run = _run(tmp_path, f"strategy={strategy}", "fed.num_clients=6", "fed.rank_ratios=[0.25,0.5,1.0]")
    method = fed_method(run)
    state = method.initial_state()
    calls = []
    real = client_mod.model_from_state
    monkeypatch.setattr(client_mod, "model_from_state", lambda r, s: calls.append(1) or real(r, s))
    _, rows = client_eval(run, method, state, fed_data(run), [0, 1, 2, 3, 4, 5])
    assert len(calls) == builds and len(rows) == 6
    assert [r["ratio"] for r in rows] == [run.fed.budget(p)["ratio"] for p in range(6)]
    alone = {p: client_eval(run, method, state, fed_data(run), [p])[1][0] for p in (0, 4)}
    for p in (0, 4):
        assert rows[p]["accuracy"] == alone[p]["accuracy"]
        assert rows[p]["loss"] == pytest.approx(alone[p]["loss"], rel=1e-6)
