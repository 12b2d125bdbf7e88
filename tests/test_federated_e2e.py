"""Short Flower simulations end to end: heterogeneous ranks, bad replies, crashes, TensorBoard."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from fedlowrank.runtime.runner import run

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


# Method checks that do not depend on the runtime use the local one (FAST: the same apps and messages without
# Ray, ~20 s less start-up per run; tests/test_local_runtime.py shows it trains what Flower's simulation trains);
# the default runtime (a private simulation SuperLink) runs the crash/log test and the resume test.
FAST = "fed.runtime=local"


def _cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["mode=federated", f"out_dir={tmp_path}", *overrides])
    return cfg


def _scalars(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.timeout(300)
def test_federated_run_rejects_bad_updates_survives_crash_and_logs(tmp_path):
    """``python main.py mode=federated`` on the default runtime (a private simulation SuperLink) with a NaN, a
    wrong-shape and a crashing client. The run begins and ends legibly on the console and in ``main.log`` (the
    output directory first; every round's lines; the closing summary with its paths), without Flower's known
    noise, and writes nothing to HOME or the working directory."""
    home, cwd, out_dir = tmp_path / "home", tmp_path / "cwd", tmp_path / "out"
    home.mkdir()
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("FEDLOWRANK_CACHE_DIR", "FLWR_HOME")}
    env.update(HOME=str(home), PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), "mode=federated", f"out_dir={out_dir}",
                           "strategy=slice", "fed.rounds=3", "fed.num_clients=5", "fed.rank_ratios=[0.25,0.5,1.0]",
                           'fed.faults=["1:nan","2:shape","3:crash"]'], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=280)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-3000:]
    log = (out_dir / "main.log").read_text()
    for out in (console, log):
        assert f"output in {out_dir}" in out.splitlines()[0]
        # default runtime: a private simulation SuperLink that builds no environment of its own (no `uv sync`)
        assert "Starting Flower Simulation" in out and "uv sync" not in out and "run_simulation" not in out
        for rnd, rejected in ((1, 2), (2, 1), (3, 1)):  # the wrong-shape client is excluded in round 1, not asked again
            line = next(ln for ln in out.splitlines() if f"round {rnd}/3: accuracy" in ln)
            assert f"| 2 trained, 1 failed, {rejected} rejected, train loss" in line and "{" not in line
        assert "federated run finished: slice · 5 clients · 3 rounds" in out and "global accuracy 0." in out
        assert f"summary: {out_dir / 'metrics.json'}" in out and f"tensorboard --logdir {out_dir}" in out
        assert "excluded by the screen (trained without from then on): client 2 in round 1" in out
        # Flower's known noise: the licence warning, the federation-size hint naming no command, the raw dumps
        for noise in ("license", "To change federation size", "Final results", "e+0", "FutureWarning"):
            assert noise not in out, noise
        # each crash is one server warning (traceback in client_failures.log), not the engine's ~80-line dump
        assert "An exception was raised when processing a message" not in out
        crashes = [ln for ln in out.splitlines() if "client 3 failed" in ln and "crashed (injected fault)" in ln]
        assert len(crashes) == 3 and out.count("Traceback (most recent call last)") == 0
    assert list(home.iterdir()) == [] and list(cwd.iterdir()) == []
    assert (out_dir / "client_failures.log").read_text().count("client 3 crashed (injected fault)") >= 3
    res = json.loads((out_dir / "metrics.json").read_text())
    assert res["excluded"] == {"2": 1}
    tmp_path = out_dir
    # the apps ran in <out_dir>/flwr_runtime: relative paths reached them resolved where the run was started
    from omegaconf import OmegaConf

    handed = OmegaConf.load(tmp_path / "flwr_runtime" / "config.yaml")
    assert handed.data.root == str(cwd / "data") and handed.out_dir == str(tmp_path)
    rounds = res["rounds_detail"]
    assert len(rounds) == 3
    for r, rejected in zip(rounds, (2, 1, 1)):
        assert r["clients_ok"] == 2 and r["rejected"] == rejected and r["failures"] == 1
        assert {int(c["pid"]) for c in r["clients"]} == {0, 4}
        assert r["upload_bytes"] > 0 and r["download_bytes"] > 0
    # clients 0 and 4 have different budgets (0.25 and 0.5): heterogeneous ranks were trained
    ranks = {int(c["pid"]): c["rank_ratio"] for c in rounds[-1]["clients"]}
    assert ranks[0] < ranks[4] < 1.0
    assert res["final"]["global_accuracy"] > 0.3  # chance is 0.1
    assert (tmp_path / "checkpoints" / "last.safetensors").exists()
    state = load_file(str(tmp_path / "checkpoints" / "last.safetensors"))
    assert any(k.endswith(".U") for k in state)
    saved = res
    assert (tmp_path / "report.png").stat().st_size > 10_000 and saved["report_png"].endswith("report.png")
    assert saved["label_skew"]["train_examples"]["min"] > 0
    personal = saved["personalized"]  # image tasks hold out 10 % per client by default (fed.client_holdout)
    assert 0.0 <= personal["min"] <= personal["mean"] <= personal["max"] <= 1.0

    sc = _scalars(tmp_path / "tb")
    for tag in ("global/global_accuracy", "global/global_loss", "round/upload_bytes", "round/download_bytes",
                "round/rejected"):
        assert tag in sc, f"missing {tag}: {sorted(sc)}"
    assert not [t for t in sc if t.startswith("client")]  # clients have runs of their own, not server tags
    assert [s for s, _ in sc["round/upload_bytes"]] == [1, 2, 3]
    assert sc["round/rejected"][0][1] == 2.0
    # one TensorBoard run per client under tb/clients/<id>, all with the same tags (they overlay on one chart)
    c0, c4 = _scalars(tmp_path / "tb" / "clients" / "0"), _scalars(tmp_path / "tb" / "clients" / "4")
    assert sorted(c0) == sorted(c4) == ["client/heldout_accuracy", "client/rank_ratio", "client/rank_sum",
                                        "client/train_loss"]  # held-out: the default 10 % per client
    assert [s for s, _ in c0["client/train_loss"]] == [1, 2, 3]
    assert c0["client/rank_sum"][0][1] < c4["client/rank_sum"][0][1]
    assert not (tmp_path / "tb" / "clients" / "1").exists()  # rejected updates are not logged as training progress
    # fed.runtime=local (the same apps, messages carried in one process): the same model bit for bit, the same
    # failures and rejections every round
    loc = run(_cfg(tmp_path.parent / "local", "strategy=slice", "fed.rounds=3", "fed.num_clients=5",
                   "fed.rank_ratios=[0.25,0.5,1.0]", 'fed.faults=["1:nan","2:shape","3:crash"]', "fed.runtime=local"))
    other = load_file(str(tmp_path.parent / "local" / "checkpoints" / "last.safetensors"))
    assert other.keys() == state.keys() and all(torch.equal(other[k], state[k]) for k in state)
    keys = ("clients_ok", "failures", "rejected")
    assert [[r[k] for k in keys] for r in loc["rounds_detail"]] == [[r[k] for k in keys] for r in rounds]


# product end to end is slow-marked (35 s): the fast suite keeps fedlmt here and product's maths in unit tests
@pytest.mark.parametrize("strategy", [pytest.param("product", marks=pytest.mark.slow), "fedlmt"])
def test_federated_strategies_learn_with_dropout(tmp_path, strategy):
    res = run(_cfg(tmp_path, f"strategy={strategy}", FAST, "fed.rounds=4", "fed.num_clients=4", "fed.dropout_prob=0.3",
                   "fed.partition=dirichlet", "fed.alpha=1.0"))
    fails = sum(r["failures"] for r in res["rounds_detail"])
    oks = sum(r["clients_ok"] for r in res["rounds_detail"])
    assert fails + oks == 16 and fails > 0 and oks > 0
    assert res["final"]["global_accuracy"] > res["initial"]["global_accuracy"] + 0.2
    if strategy == "fedlmt":  # everyone trains the smallest budget
        ratios = {c["rank_ratio"] for r in res["rounds_detail"] for c in r["clients"]}
        assert len(ratios) == 1


def test_federated_relora_heterogeneous_adapters_merge_each_round(tmp_path):
    res = run(_cfg(tmp_path, "experiment=fed_relora", FAST, "fed.rounds=4", "fed.num_clients=3",
                   "fed.rank_ratios=[0.1,0.5,1.0]"))
    r1 = res["rounds_detail"][0]
    assert r1["clients_ok"] == 3 and r1["rejected"] == 0
    ratios = sorted(c["rank_ratio"] for c in r1["clients"])
    assert ratios[0] < ratios[1] < ratios[2]  # adapters follow each client's budget
    assert all(c["trainable_params"] < c["params"] for c in r1["clients"])  # base frozen
    assert r1["upload_bytes"] < r1["download_bytes"]  # adapters up, dense model down
    assert res["final"]["global_accuracy"] > res["initial"]["global_accuracy"] + 0.3


def test_federated_from_welore_compressed_model(tmp_path):
    res = run(_cfg(tmp_path, "experiment=fed_welore", FAST, "fed.rounds=3", "fed.num_clients=3", "fed.rank_ratios=[0.25,0.5,1.0]",
                   "method.pretrain_steps=60"))
    state = load_file(str(tmp_path / "checkpoints" / "last.safetensors"))
    ranks = {k[:-2]: v.shape[1] for k, v in state.items() if k.endswith(".U")}
    assert ranks and "head.U" not in ranks  # LRCs only where WeLore chose them; head kept dense
    c = res["rounds_detail"][0]["clients"][0]
    assert c["trainable_params"] < c["params"]  # only the low-rank components train
    assert res["final"]["global_accuracy"] > 0.6


def _ray_pids() -> set[int]:
    """Live Ray and Flower runtime processes (raylet, GCS, workers, SuperLink, SuperExec), read from /proc."""
    out = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next((ln for ln in (d / "status").read_text().splitlines() if ln.startswith("State:")), "")
        except OSError:
            continue
        if "Z" not in state and ("raylet" in cmd or "gcs_server" in cmd or "ray::" in cmd or "/ray/" in cmd
                                  or "flower-super" in cmd or "flwr-simulation" in cmd):
            out.add(int(d.name))
    return out


@pytest.mark.slow  # three runs, two on the SuperLink runtime: 2.5 min on 2 cores
@pytest.mark.timeout(600)
def test_federated_resume_after_kill_matches_uninterrupted_run(tmp_path):
    """Killed while checkpointing round 3 (files written, no manifest yet): fed.resume=auto continues
    after round 2 and ends with the same global model, bit for bit, as a run that was never killed.
    On the default runtime the process that dies is the SuperLink's simulation process: main.py must fail
    (flwr run itself exits 0) and leave no SuperLink, SuperExec or Ray process behind."""
    import os
    import subprocess
    import sys
    import time

    from fedlowrank.checkpoint import read_jsonl

    # 2 of 4 clients a round: a resume that re-seeded the sampling RNG instead of restoring it would pick others
    common = ["strategy=product", "fed.rounds=4", "fed.num_clients=4", "fed.local_steps=5",
              "fed.fraction_train=0.5", "fed.eval_budgets=false"]
    full = run(_cfg(tmp_path / "full", *common, "fed.runtime=simulation"))  # another runtime: the same model
    before = _ray_pids()
    part = tmp_path / "part"
    cmd = [sys.executable, "main.py", "mode=federated", *common, f"out_dir={part}", f"hydra.run.dir={part}/hydra"]
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, FEDLOWRANK_CRASH_AT="files_written@round-000003"))
    assert proc.returncode == 1 and "ended before the run finished" in proc.stderr, proc.stderr[-2000:]
    deadline = time.time() + 15
    while (left := _ray_pids() - before) and time.time() < deadline:
        time.sleep(1)
    assert not left, f"Ray processes outlived the killed run: {left}"
    res = run(_cfg(part, *common, "fed.resume=auto"))
    assert res["resumed_after"] == 2 and len(res["rounds_detail"]) == 4
    st = json.loads((part / "checkpoints" / "round-000004" / "strategy.json").read_text())
    assert st["round"] == 4 and sorted(st["budgets"]) == ["0", "1", "2", "3"] and len(st["rng"][1]) == 625
    sampled = [sorted(int(c["pid"]) for c in r["clients"]) for r in full["rounds_detail"]]
    assert all(len(x) == 2 for x in sampled) and sampled[2:] != sampled[:2]  # a re-seeded RNG would repeat 1-2
    assert [sorted(int(c["pid"]) for c in r["clients"]) for r in res["rounds_detail"]] == sampled
    a = load_file(str(tmp_path / "full" / "checkpoints" / "last.safetensors"))
    b = load_file(str(part / "checkpoints" / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert res["final"] == full["final"]
    rounds = [(r["round"], "eval" in r) for r in read_jsonl(part / "rounds.jsonl")]
    assert sorted(rounds) == sorted({(r, e) for r in range(5) for e in (True, False) if e or r > 0})
