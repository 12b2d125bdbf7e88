"""Synthetic(α, β) of FedProx: the generator's statistics against the paper's definition."""
from __future__ import annotations

import numpy as np
import pytest

from fedlowrank.data.synthetic import DIM, generate


def test_client_sizes_follow_the_power_law():
    d = generate(2000, 1.0, 1.0, seed=0, test_fraction=0.2)
    sizes = np.array([len(a) + len(b) for a, b in zip(d.train_parts, d.heldout_parts)])
    assert sizes.min() >= 50
    logs = np.log(sizes - 50 + 0.5)  # floor of lognormal(4, 2)
    assert abs(np.median(logs) - 4) < 0.15 and abs(np.subtract(*np.percentile(logs, [84.1, 15.9])) / 2 - 2) < 0.2
    assert all(abs(len(h) - 0.2 * s) <= 1 for h, s in zip(d.heldout_parts, sizes))  # each client's held-out share
    every = np.sort(np.concatenate(d.train_parts + d.heldout_parts))
    assert np.array_equal(every, np.arange(len(d.y)))  # a partition of all examples


@pytest.mark.parametrize("iid", [False, True])
def test_the_same_seed_gives_the_examples_of_a_literal_transcription(iid):
    """Published figures depend on these exact examples: the generator (filled in place, float32) equals the
    definition drawn client by client (u, B, W, b, v, x, then the held-out permutation) in float64, bit for bit."""
    d = generate(40, 0.5, 1.0, iid=iid, seed=3)
    rng = np.random.default_rng(3)
    sizes = rng.lognormal(4, 2, 40).astype(np.int64) + 50
    W0, b0 = rng.normal(0, 1, (10, DIM)), rng.normal(0, 1, 10)
    start = 0
    for k, n in enumerate(sizes):
        if iid:
            W, b, v = W0, b0, np.zeros(DIM)
        else:
            u, B = rng.normal(0, 0.5), rng.normal(0, 1.0)
            W, b = rng.normal(u, 1, (10, DIM)), rng.normal(u, 1, 10)
            v = rng.normal(B, 1, DIM)
        x = v + rng.normal(0, 1, (n, DIM)) * np.sqrt(np.arange(1, DIM + 1, dtype=np.float64) ** -1.2)
        assert np.array_equal(d.x[start:start + n].numpy(), x.astype(np.float32))
        assert np.array_equal(d.y[start:start + n].numpy(), np.argmax(x @ W.T + b, axis=1))
        assert np.array_equal(d.models[k][0], W) and np.array_equal(d.models[k][1], b)
        idx = start + rng.permutation(n)
        assert np.array_equal(d.heldout_parts[k], np.sort(idx[:round(0.2 * n)]))
        start += n
    assert start == len(d.y) == len(d.x)


def test_inputs_labels_and_heterogeneity_match_the_definition():
    d = generate(300, 1.0, 1.0, seed=1, max_per_client=400)
    x, y = d.x.double().numpy(), d.y.numpy()
    sigma = np.arange(1, DIM + 1) ** -1.2
    means, within = [], []
    for k, (tr, he) in enumerate(zip(d.train_parts, d.heldout_parts)):
        idx = np.concatenate([tr, he])
        xk = x[idx]
        W, b = d.models[k]
        assert np.array_equal(np.argmax(xk @ W.T + b, axis=1), y[idx])  # y = argmax softmax(W x + b)
        means.append(xk.mean(0))
        within.append(((xk - xk.mean(0)) ** 2).sum(0))
    n = sum(len(a) + len(b) for a, b in zip(d.train_parts, d.heldout_parts)) - len(means)
    np.testing.assert_allclose(np.sum(within, 0) / n, sigma, rtol=0.08)  # within-client covariance Σ = diag(j^-1.2)
    v = np.array(means)  # ≈ v_k; v_kj = B_k + N(0, 1) with B_k ~ N(0, β²): Var(v_kj) ≈ β² + 1, Cov across j ≈ β²
    assert abs(v.var() - 2.0) < 0.4 and abs(np.mean(np.corrcoef(v.T)[np.triu_indices(DIM, 1)]) - 0.5) < 0.1
    us = np.array([W.mean() for W, _ in d.models])  # ≈ u_k ~ N(0, α²)
    assert abs(us.std() - 1.0) < 0.15


@pytest.mark.parametrize("alpha,beta", [(0.0, 0.0), (0.5, 0.5)])
def test_heterogeneity_grows_with_alpha_and_beta_and_iid_shares_one_model(alpha, beta):
    iid = generate(50, alpha, beta, iid=True, seed=2, max_per_client=200)
    assert all(np.array_equal(W, iid.models[0][0]) for W, _ in iid.models)
    assert abs(iid.x.double().mean().item()) < 0.05  # x ~ N(0, Σ)
    non = generate(400, alpha, beta, seed=3, max_per_client=50)
    spread = np.std([W.mean() for W, _ in non.models])  # std of u_k + the mean of 600 N(0, 1) draws
    assert abs(spread - np.sqrt(alpha**2 + 1 / 600)) < 0.1


def test_data_synthetic_runs_federated_with_one_client_per_user(tmp_path):
    import torch
    from helpers import compose_cfg

    from fedlowrank.config import ConfigError, federated_run_from_cfg
    from fedlowrank.federated.task import fed_data
    from fedlowrank.runtime.inprocess import InProcessGrid, make_strategy, run_rounds

    base = ["mode=federated", "experiment=fed_synthetic", f"out_dir={tmp_path}", "fed.num_clients=12",
            "fed.fraction_train=0.5", "fed.local_steps=3", "fed.eval_budgets=false"]
    with pytest.raises(ConfigError, match="fed.partition=natural"):
        federated_run_from_cfg(compose_cfg(*base, "fed.partition=iid"))
    with pytest.raises(ConfigError, match="model=mlp"):
        federated_run_from_cfg(compose_cfg(*base, "model=cnn"))
    run = federated_run_from_cfg(compose_cfg(*base, "model.hidden=[]"))  # softmax regression
    fd = fed_data(run)
    want = generate(12, 1.0, 1.0, seed=0, test_fraction=0.2)
    assert torch.equal(fd.x, want.x) and len(fd.train_parts) == 12
    assert len(fd.test) == sum(len(h) for h in want.heldout_parts)
    st = make_strategy(run)
    run_rounds(st, InProcessGrid(run), 2)
    assert [h["clients_ok"] for h in st.history] == [6, 6]


def test_each_sampled_client_is_evaluated_on_its_own_heldout_split(tmp_path):
    """Every eval round: the sampled clients' held-out accuracies (checked against evaluate_classifier on each
    client's split) in rounds.jsonl, their mean / p10 / p90 / worst, overall and per budget."""
    import json

    from helpers import compose_cfg
    from torch.utils.data import DataLoader

    from fedlowrank.config import federated_run_from_cfg
    from fedlowrank.federated.client import model_from_state
    from fedlowrank.federated.server import _ServerRun
    from fedlowrank.federated.task import fed_data
    from fedlowrank.runtime.inprocess import InProcessGrid
    from fedlowrank.training.loop import evaluate_classifier

    run = federated_run_from_cfg(compose_cfg(
        "mode=federated", "experiment=fed_synthetic", f"out_dir={tmp_path}", "fed.num_clients=12", "fed.rounds=2",
        "fed.fraction_train=0.5", "fed.local_steps=3", "fed.rank_ratios=[0.5,1.0]"))
    sr, grid = _ServerRun(run), InProcessGrid(run)  # the server's own round loop, without Flower's Grid
    sr.evaluate(0, sr.strategy.global_state)
    for rnd in (1, 2):
        st = sr.strategy
        st.aggregate_train(rnd, grid.send_and_receive(list(st.configure_train(rnd, None, None, grid))))
        sr.evaluate(rnd, st.global_state)
    summary = sr.finish(0.0)
    recs = [json.loads(line) for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    evals = {r["round"]: r for r in recs if "eval" in r}
    assert "clients" not in evals[0]  # before training nobody was sampled
    sampled = {r["round"]: sorted(int(c["pid"]) for c in r["train"]["clients"]) for r in recs if "train" in r}
    fd = fed_data(run)
    from safetensors.torch import load_file

    final = load_file(str(tmp_path / "checkpoints" / "last.safetensors"))
    rows = evals[2]["clients"]
    assert [r["pid"] for r in rows] == sampled[2] and summary["final_clients"] == rows
    from fedlowrank.federated.methods import fed_method

    method = fed_method(run)
    for r in rows:
        view = method.view(final, run.fed.budget(r["pid"]))
        want = evaluate_classifier(model_from_state(run, view), DataLoader(fd.client_heldout(r["pid"]), batch_size=64))
        assert r["accuracy"] == pytest.approx(want["accuracy"])
    acc = np.array([r["accuracy"] for r in rows])
    e = evals[2]["eval"]
    assert e["clients_mean_accuracy"] == pytest.approx(acc.mean()) and e["clients_worst_accuracy"] == acc.min()
    assert e["clients_p10_accuracy"] == pytest.approx(np.percentile(acc, 10))
    half = np.array([r["accuracy"] for r in rows if r.get("ratio") == 0.5])
    assert e["ratio0.5_clients_mean_accuracy"] == pytest.approx(half.mean())
    assert len(fd.heldout_parts) == 12


@pytest.mark.timeout(300)
def test_a_thousand_synthetic_clients_reach_and_finish_their_round(tmp_path):
    """1000 clients, 10 sampled: numpy's BLAS pool stalled the server's data generation inside the simulation
    (no round 1 after 400 s); the run now completes, every sampled client trained."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, str(root / "main.py"), "mode=federated", "data=synthetic",
                        "fed.partition=natural", "fed.num_clients=1000", "fed.fraction_train=0.01", "fed.rounds=1",
                        "fed.runtime=simulation", f"out_dir={tmp_path}"], capture_output=True, text=True, cwd=root,
                       timeout=280, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["num_clients"] == 1000 and [r["clients_ok"] for r in m["rounds_detail"]] == [10]
    # a clean console at 1000 clients: no warning (run_simulation's deprecation, which the user chose, nor Ray's
    # address lookup in the private network) and no line that grows with the population (the partition dict did)
    lines = (p.stdout + p.stderr).splitlines()
    assert not [line for line in lines if "WARNING" in line or "ERROR" in line or "deprecated feature" in line]
    assert not [line for line in lines if "Failed to determine local IP" in line]
    assert max(map(len, lines)) < 1000 and len(lines) < 40
    # the run is ended once its summary is out (runner.wait_or_end): nothing it wrote is missing
    rows = [json.loads(line) for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert [(r["round"], "train" in r, "eval" in r) for r in rows] == [(0, False, True), (1, True, False),
                                                                         (1, False, True)]
    ckpt = tmp_path / "checkpoints"
    assert (ckpt / "round-000001").is_dir() and (ckpt / "last.safetensors").is_file()
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*")) and (tmp_path / "report.png").is_file()
    assert "tensorboard --logdir" in (tmp_path / "main.log").read_text()
