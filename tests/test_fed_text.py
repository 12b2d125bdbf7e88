"""Federated Shakespeare (LEAF style): role parsing, next-character windows, natural partitions via
flwr-datasets, config errors before training, a short in-process run that learns; per-client
(personalised) evaluation and the label-skew summary against hand computations."""
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fedlowrank.config import ConfigError, federated_run_from_cfg
from fedlowrank.data.shakespeare import load_role_text, natural_partitions, parse_roles
from fedlowrank.federated.client import model_from_state
from fedlowrank.runtime.inprocess import InProcessGrid, make_strategy, run_rounds
from fedlowrank.federated.methods import fed_method
from fedlowrank.federated.report import label_skew, personalized_eval
from fedlowrank.runtime.runner import check_partitions
from fedlowrank.federated.task import FedData, fed_data
from fedlowrank.training.loop import IGNORE, evaluate_classifier
from helpers import compose_cfg, text_run

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
PLAY = """First Citizen:
Before we proceed any further, hear me speak.

All:
Speak, speak.

First Citizen:
You are all resolved rather to die than to famish?

and a second block of the same speech.

MENENIUS:
Why, masters, my good friends, mine honest neighbours,
Will you undo yourselves?
"""


def test_parse_roles_joins_continuations():
    roles = parse_roles(PLAY)
    assert sorted(roles) == ["All", "First Citizen", "MENENIUS"]
    assert roles["First Citizen"] == ("Before we proceed any further, hear me speak.\n"
                                      "You are all resolved rather to die than to famish?\n"
                                      "and a second block of the same speech.")
    assert roles["MENENIUS"].endswith("Will you undo yourselves?")


def test_windows_shift_by_one_and_hold_out_per_role(play):
    d = load_role_text(play, seq_len=16, test_fraction=0.25, seed=3)
    roles = parse_roles(play.read_text())
    assert torch.equal(d.x[:, 1:], d.y[:, :-1])  # y is x shifted by one character
    for i in range(0, len(d.x), 7):  # every window is a substring of its own role's text
        text = "".join(d.vocab[c] for c in d.x[i].tolist()) + d.vocab[d.y[i, -1]]
        assert text in roles[d.roles[d.role[i]]]
    for r in np.unique(d.role):
        n = (d.role == r).sum()
        assert d.test[d.role == r].sum() == round(0.25 * n)
    again = load_role_text(play, seq_len=16, test_fraction=0.25, seed=3)
    assert np.array_equal(again.test, d.test) and torch.equal(again.x, d.x)


def test_natural_partitions_one_role_per_client_largest_first(play):
    d = load_role_text(play, seq_len=16, test_fraction=0.2, seed=0)
    train, held = natural_partitions(d, 3, min_size=2)
    counts = np.bincount(d.role[~d.test], minlength=len(d.roles))
    expected = sorted(np.argsort(-counts, kind="stable")[:3])
    got = [int(np.unique(d.role[t])[0]) for t in train]
    assert got == expected and all(len(np.unique(d.role[t])) == 1 for t in train)
    for t, h, r in zip(train, held, got):
        assert not d.test[t].any() and d.test[h].all() and (d.role[h] == r).all()
        assert len(t) == counts[r]
    with pytest.raises(ValueError, match="only 6 roles"):
        natural_partitions(d, 7, min_size=1)


def test_config_errors_before_training(play, tmp_path):
    with pytest.raises(ConfigError, match="data.path"):
        text_run(tmp_path / "missing.txt")
    with pytest.raises(ConfigError, match="natural"):
        federated_run_from_cfg(compose_cfg("mode=federated", "fed.partition=natural", "out_dir=/tmp/x"))
    with pytest.raises(ConfigError, match="dirichlet"):
        text_run(play, "fed.partition=dirichlet")
    with pytest.raises(ConfigError, match="model=lstm"):
        text_run(play, "model=mlp")
    with pytest.raises(ConfigError, match="block_size"):
        text_run(play, "model=char_transformer", "model.block_size=8")
    with pytest.raises(ConfigError, match="hiden"):
        text_run(play, "+model.hiden=3")
    with pytest.raises(ConfigError, match="roles"):  # more clients than roles: refused before any training
        check_partitions(text_run(play, "fed.num_clients=9"))


def test_text_run_learns_and_personalised_eval_matches_hand_computation(play):
    run = text_run(play, "fed.num_clients=4", "fed.rank_ratios=[0.25,1.0]", "model.hidden=32", "model.emb_dim=16")
    strategy, grid = make_strategy(run), InProcessGrid(run)
    fd = fed_data(run)
    test = DataLoader(fd.test, batch_size=256)
    before = evaluate_classifier(model_from_state(run, strategy.global_state), test)["accuracy"]
    run_rounds(strategy, grid, 3)
    after = evaluate_classifier(model_from_state(run, strategy.global_state), test)["accuracy"]
    scored = fd.test.tensors[1][fd.test.tensors[1] != IGNORE]  # LEAF: one scored character per window
    unigram = np.bincount(scored.numpy()).max() / scored.numel()
    assert after > max(before, unigram) + 0.05
    method = fed_method(run)
    res = personalized_eval(run, method, strategy.global_state, fd)
    assert [c["pid"] for c in res["clients"]] == [0, 1, 2, 3]
    for c in res["clients"]:  # independent: the budget view evaluated on that client's own held-out windows
        view = method.view(strategy.global_state, run.fed.budget(c["pid"]))
        x, y = fd.x[fd.heldout_parts[c["pid"]]], fd.y[fd.heldout_parts[c["pid"]]]
        pred = model_from_state(run, view)(x).argmax(-1)[:, -1]  # LEAF: the character after the whole window
        assert c["accuracy"] == pytest.approx((pred == y[:, -1]).float().mean().item())
    accs = [c["accuracy"] for c in res["clients"]]
    assert res["mean"] == pytest.approx(np.mean(accs)) and res["min"] == min(accs)


def test_small_transformer_option_trains_factorized(play):
    """model=char_transformer: a 2-layer GPT-2 on the same task; its attention/MLP linears are factorized at
    the clients' budgets (embeddings and the tied head dense) and the global model learns."""
    run = text_run(play, "model=char_transformer", "fed.num_clients=3", "fed.rank_ratios=[0.25,1.0]", "model.n_embd=32",
               "model.n_head=2", "fed.lr=0.5", "fed.momentum=0.9")
    strategy, grid = make_strategy(run), InProcessGrid(run)
    assert any(k.endswith("attn.c_attn.U") for k in strategy.global_state)
    assert not any(k.startswith(("wte.", "lm_head.")) and k.endswith(".U") for k in strategy.global_state)
    test = DataLoader(fed_data(run).test, batch_size=256)
    before = evaluate_classifier(model_from_state(run, strategy.global_state), test)["accuracy"]
    run_rounds(strategy, grid, 3)
    after = evaluate_classifier(model_from_state(run, strategy.global_state), test)["accuracy"]
    assert after > before + 0.1


def test_label_skew_by_hand():
    y = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    fd = FedData(torch.zeros(8, 1), y, [np.array([0, 1, 6]), np.array([2, 3, 4, 5, 7])], None,
                 None, 3)  # type: ignore[arg-type]
    s = label_skew(fd)
    pooled = np.array([3, 3, 2]) / 8
    tv = [0.5 * np.abs(np.array([1, 0, 0]) - pooled).sum(), 0.5 * np.abs(np.array([0, 3, 2]) / 5 - pooled).sum()]
    assert s["tv_distance"]["max"] == pytest.approx(max(tv)) and s["tv_distance"]["mean"] == pytest.approx(np.mean(tv))
    assert s["top_label_share"]["min"] == pytest.approx(0.6) and s["labels_present"]["min"] == 1


def test_image_client_holdout_is_disjoint_and_seeded():
    run = federated_run_from_cfg(compose_cfg("mode=federated", "fed.client_holdout=0.2", "out_dir=/tmp/x"))
    fd = fed_data(run)
    for t, h in zip(fd.train_parts, fd.heldout_parts):
        assert len(np.intersect1d(t, h)) == 0 and abs(len(h) - 0.2 * (len(t) + len(h))) <= 1
    assert len(np.concatenate([*fd.train_parts, *fd.heldout_parts])) == len(fd.y)  # iid covers the train split


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason="needs ../shared/data/tinyshakespeare.txt")
def test_tinyshakespeare_natural_partition():
    d = load_role_text(SHAKESPEARE)
    assert d.vocab_size == 65 and len(d.roles) > 250 and d.x.shape[1] == 80
    train, held = natural_partitions(d, 100, min_size=10)
    assert len(train) == 100 and all(len(t) >= 10 for t in train)
    assert len(np.unique(np.concatenate([np.unique(d.role[t]) for t in train]))) == 100


def test_hub_datasets_config_and_clear_offline_error(tmp_path):
    """Hub datasets go through flwr-datasets' FederatedDataset; offline, the run stops before training with
    exit code 2 and a message that says what is missing."""
    import os
    import subprocess
    import sys

    with pytest.raises(ConfigError, match="source=hub"):
        federated_run_from_cfg(compose_cfg("mode=federated", "data=femnist", "data.source=local", "out_dir=/tmp/x"))
    with pytest.raises(ConfigError, match="serves"):
        federated_run_from_cfg(compose_cfg("mode=federated", "data.source=hub", "out_dir=/tmp/x"))
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "main.py", "mode=federated", "data=femnist", "fed.partition=natural",
                           f"out_dir={tmp_path}"], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "flwrlabs/femnist could not be loaded" in proc.stderr + proc.stdout
    assert "internet" in proc.stderr + proc.stdout
