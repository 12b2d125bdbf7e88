"""Short Flower simulations end to end: heterogeneous ranks, bad replies, crashes, TensorBoard."""
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from fedlowrank.federated.runner import run

CONF = Path(__file__).resolve().parents[1] / "conf"


def _cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["mode=federated", f"out_dir={tmp_path}", *overrides])
    return cfg


def _scalars(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_federated_run_rejects_bad_updates_survives_crash_and_logs(tmp_path):
    res = run(_cfg(tmp_path, "strategy=slice", "fed.rounds=3", "fed.num_clients=5",
                   "fed.rank_ratios=[0.25,0.5,1.0]", "fed.faults=[\"1:nan\",\"2:shape\",\"3:crash\"]"))
    rounds = res["rounds_detail"]
    assert len(rounds) == 3
    for r in rounds:
        assert r["clients_ok"] == 2 and r["rejected"] == 2 and r["failures"] == 1
        assert {int(c["pid"]) for c in r["clients"]} == {0, 4}
        assert r["upload_bytes"] > 0 and r["download_bytes"] > 0
    # clients 0 and 4 have different budgets (0.25 and 0.5): heterogeneous ranks were trained
    ranks = {int(c["pid"]): c["rank_ratio"] for c in rounds[-1]["clients"]}
    assert ranks[0] < ranks[4] < 1.0
    assert res["final"]["global_accuracy"] > 0.3  # chance is 0.1
    assert (tmp_path / "checkpoints" / "last.safetensors").exists()
    state = load_file(str(tmp_path / "checkpoints" / "last.safetensors"))
    assert any(k.endswith(".U") for k in state)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["final"]["global_accuracy"] == pytest.approx(res["final"]["global_accuracy"])

    sc = _scalars(tmp_path / "tb")
    for tag in ("global/global_accuracy", "global/global_loss", "round/upload_bytes", "round/download_bytes",
                "client_0/train_loss", "client_0/rank_sum", "client_4/rank_ratio", "round/rejected"):
        assert tag in sc, f"missing {tag}: {sorted(sc)}"
    assert [s for s, _ in sc["round/upload_bytes"]] == [1, 2, 3]
    assert sc["round/rejected"][0][1] == 2.0
    assert sc["client_0/rank_sum"][0][1] < sc["client_4/rank_sum"][0][1]
    assert "client_1/train_loss" not in sc  # rejected updates are not logged as training progress


@pytest.mark.parametrize("strategy", ["product", "fedlmt"])
def test_federated_strategies_learn_with_dropout(tmp_path, strategy):
    res = run(_cfg(tmp_path, f"strategy={strategy}", "fed.rounds=4", "fed.num_clients=4", "fed.dropout_prob=0.3",
                   "fed.partition=dirichlet", "fed.alpha=1.0"))
    fails = sum(r["failures"] for r in res["rounds_detail"])
    oks = sum(r["clients_ok"] for r in res["rounds_detail"])
    assert fails + oks == 16 and fails > 0 and oks > 0
    assert res["final"]["global_accuracy"] > res["initial"]["global_accuracy"] + 0.2
    if strategy == "fedlmt":  # everyone trains the smallest budget
        ratios = {c["rank_ratio"] for r in res["rounds_detail"] for c in r["clients"]}
        assert len(ratios) == 1


def test_federated_relora_heterogeneous_adapters_merge_each_round(tmp_path):
    res = run(_cfg(tmp_path, "experiment=fed_relora", "fed.rounds=4", "fed.num_clients=3",
                   "fed.rank_ratios=[0.1,0.5,1.0]"))
    r1 = res["rounds_detail"][0]
    assert r1["clients_ok"] == 3 and r1["rejected"] == 0
    ratios = sorted(c["rank_ratio"] for c in r1["clients"])
    assert ratios[0] < ratios[1] < ratios[2]  # adapters follow each client's budget
    assert all(c["trainable_params"] < c["params"] for c in r1["clients"])  # base frozen
    assert r1["upload_bytes"] < r1["download_bytes"]  # adapters up, dense model down
    assert res["final"]["global_accuracy"] > res["initial"]["global_accuracy"] + 0.3


def test_federated_from_welore_compressed_model(tmp_path):
    res = run(_cfg(tmp_path, "experiment=fed_welore", "fed.rounds=3", "fed.num_clients=3",
                   "method.pretrain_steps=60"))
    state = load_file(str(tmp_path / "checkpoints" / "last.safetensors"))
    ranks = {k[:-2]: v.shape[1] for k, v in state.items() if k.endswith(".U")}
    assert ranks and "head.U" not in ranks  # LRCs only where WeLore chose them; head kept dense
    c = res["rounds_detail"][0]["clients"][0]
    assert c["trainable_params"] < c["params"]  # only the low-rank components train
    assert res["final"]["global_accuracy"] > 0.6
