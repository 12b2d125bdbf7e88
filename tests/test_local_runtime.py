"""``fed.runtime=local``: the same ServerApp/ClientApp message flow as Flower's simulation, in one process."""
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from safetensors.torch import load_file

from fedlowrank.runtime.runner import run

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["mode=federated", "strategy=product", "fed.rounds=3", "fed.num_clients=4", "fed.local_steps=4",
          "fed.fraction_train=0.75", 'fed.faults=["1:nan","2:crash"]']


def _cfg(out, *extra):
    from fedlowrank.federated.run_config import compose_cfg

    return compose_cfg([*COMMON, f"out_dir={out}", *extra])


@pytest.mark.slow  # the default runtime against local is in tests/test_federated_e2e.py's crash/log test
@pytest.mark.timeout(240)
def test_local_runtime_trains_the_same_model_as_flowers_simulation(tmp_path):
    """Same config on Flower's run_simulation (Ray) and on the local runtime, with a NaN and a crashing client:
    the same global model bit for bit, the same rejections and failures per round."""
    sim = run(_cfg(tmp_path / "sim", "fed.runtime=simulation"))
    loc = run(_cfg(tmp_path / "loc", "fed.runtime=local"))
    a = load_file(str(tmp_path / "sim" / "checkpoints" / "last.safetensors"))
    b = load_file(str(tmp_path / "loc" / "checkpoints" / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    keys = ("clients_ok", "failures", "rejected")
    assert [[r[k] for k in keys] for r in sim["rounds_detail"]] == [[r[k] for k in keys] for r in loc["rounds_detail"]]
    assert sum(r["failures"] + r["rejected"] for r in loc["rounds_detail"]) > 0  # the faults did reach the server
    assert loc["final"]["global_accuracy"] == sim["final"]["global_accuracy"]
    assert not (tmp_path / "loc" / "flwr_runtime").exists()  # no SuperLink, no staged app


@pytest.mark.timeout(120)
def test_eval_every_skips_evaluations_and_leaves_training_alone(tmp_path, caplog):
    """``fed.eval_every=2`` over 3 rounds: the global and the clients' held-out evaluations in rounds 0, 2 and 3
    (the last) only, a "not evaluated" line for round 1, and the model and final figures of evaluating every round
    (an evaluation that drew from a generator the training uses would change them)."""
    every = run(_cfg(tmp_path / "e1", "fed.runtime=local"))
    with caplog.at_level(logging.INFO, logger="fedlowrank.federated.server"):
        sparse = run(_cfg(tmp_path / "e2", "fed.runtime=local", "fed.eval_every=2"))
    rows = [json.loads(line) for line in (tmp_path / "e2" / "rounds.jsonl").read_text().splitlines()]
    assert sorted(r["round"] for r in rows if "eval" in r) == [0, 2, 3]
    assert sorted(r["round"] for r in rows if "train" in r) == [1, 2, 3]
    said = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("round 1/3: not evaluated (fed.eval_every) | 2 trained") for m in said), said
    assert any(m.startswith("round 2/3: accuracy") for m in said), said
    a = load_file(str(tmp_path / "e1" / "checkpoints" / "last.safetensors"))
    b = load_file(str(tmp_path / "e2" / "checkpoints" / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sparse["final"] == every["final"] and sparse["final_clients"] == every["final_clients"]
    # metrics.json keeps the settings the run resolved, not only the asked-for ``auto``
    fed = json.loads((tmp_path / "e2" / "metrics.json").read_text())["settings"]["fed"]
    assert (fed["eval_every"], fed["lr"], fed["screen"], fed["clip_auto"]) == (2, 0.05, "exclude", None)


def test_local_grid_runs_the_client_app_and_delivers_a_duplicate_twice(tmp_path):
    """The grid hands each message to the ClientApp (its partition from the server's message), answers a
    failing handler with an error reply, and a ``duplicate`` client's reply arrives twice."""
    from fedlowrank.config import federated_run_from_cfg
    from fedlowrank.federated.apps import make_client_app
    from fedlowrank.federated.methods import fed_method
    from fedlowrank.runtime.local import FIRST_NODE, LocalGrid

    fr = federated_run_from_cfg(_cfg(tmp_path, "fed.faults=[\"3:duplicate\",\"2:crash\"]"))
    grid, method = LocalGrid(fr, make_client_app(fr)), fed_method(fr)
    state = method.initial_state()

    def msg(pid: int) -> Message:
        cfg = ConfigRecord({"partition-id": pid, "server-round": 1})
        arrays = ArrayRecord(method.view(state, fr.fed.budget(pid)))  # the cut a client of that budget gets
        return Message(RecordDict({"arrays": arrays, "config": cfg}), dst_node_id=FIRST_NODE + pid,
                       message_type="train")

    replies = list(grid.send_and_receive([msg(0), msg(2), msg(3)]))
    by_node: dict[int, list[Message]] = {}
    for r in replies:
        by_node.setdefault(r.metadata.src_node_id, []).append(r)
    assert sorted(by_node) == [FIRST_NODE, FIRST_NODE + 2, FIRST_NODE + 3] and len(by_node[FIRST_NODE + 3]) == 2
    assert by_node[FIRST_NODE][0].has_content() and by_node[FIRST_NODE][0].content["metrics"]["partition_id"] == 0
    assert by_node[FIRST_NODE + 2][0].has_error()  # the crash fault: an error reply, not an exception here
    assert list(grid.pull_messages([r.metadata.reply_to_message_id for r in replies])) == []  # each pulled once
    with pytest.raises(ValueError, match="no node"):
        grid.push_messages([Message(RecordDict(), dst_node_id=7, message_type="train")])


def test_main_py_on_the_local_runtime_starts_no_flower_services(tmp_path):
    """``python main.py mode=federated fed.runtime=local``: no SuperLink or Ray line, no Flower banner, the round
    lines and summary; an unknown runtime is refused with the choices, exit 2."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "main.py", "mode=federated", "fed.runtime=local", "fed.rounds=2",
                           f"out_dir={out}", f"hydra.run.dir={out}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-2000:]
    for noise in ("SuperLink", "Ray", "Strategy execution finished", "Starting Flower", "WARNING"):
        assert noise not in console, noise
    assert "round 2/2: accuracy" in console and "global accuracy" in console
    bad = subprocess.run([sys.executable, "main.py", "mode=federated", "fed.runtime=ray", f"out_dir={out}2",
                          f"hydra.run.dir={out}2"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "superlink|simulation|local" in bad.stderr + bad.stdout
