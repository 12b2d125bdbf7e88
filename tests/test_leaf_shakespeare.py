"""Federated Shakespeare as LEAF runs it: LEAF's evaluation protocol (the next character after each held-out
80-character context) against an independent computation, ~100 roles of the shared text with 10 sampled per round,
and LEAF's model (embedding 8, 2 x 256 LSTM) counted by hand."""
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fedlowrank.federated.task import fed_data, leaf_targets
from fedlowrank.models.build import dense_model
from fedlowrank.training.loop import IGNORE, evaluate_classifier, train_classifier
from helpers import compose_cfg

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def _lstm(vocab=11):
    torch.manual_seed(0)
    return dense_model({"family": "lstm", "emb_dim": 4, "hidden": 8}, "shakespeare", vocab).eval()


def test_leaf_protocol_scores_only_the_character_after_the_full_context():
    model = _lstm()
    x = torch.randint(0, 11, (37, 12))
    y = torch.randint(0, 11, (37, 12))
    res = evaluate_classifier(model, DataLoader(TensorDataset(x, leaf_targets(y)), batch_size=10))
    with torch.no_grad():
        last = model(x)[:, -1].numpy()  # (N, vocab): the prediction after 12 characters of context
    logp = last - np.log(np.exp(last - last.max(1, keepdims=True)).sum(1, keepdims=True)) - last.max(1, keepdims=True)
    assert res["accuracy"] == pytest.approx(float((last.argmax(1) == y[:, -1].numpy()).mean()))
    assert res["loss"] == pytest.approx(float(-logp[np.arange(37), y[:, -1].numpy()].mean()), rel=1e-5)
    every = evaluate_classifier(model, DataLoader(TensorDataset(x, y), batch_size=10))
    assert every["accuracy"] != res["accuracy"]  # the two protocols differ on the same model


def test_ignored_targets_are_not_counted_in_training_statistics():
    model = _lstm().train()
    x, y = torch.randint(0, 11, (8, 6)), torch.randint(0, 11, (8, 6))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the statistics of an unchanged model
    res = train_classifier(model, DataLoader(TensorDataset(x, leaf_targets(y)), batch_size=8), opt)
    with torch.no_grad():
        pred = model(x)[:, -1].argmax(-1)
    assert res["accuracy"] == pytest.approx(float((pred == y[:, -1]).float().mean()))
    assert (leaf_targets(y)[:, :-1] == IGNORE).all()


def test_lstm_leaf_is_leafs_model():
    cfg = compose_cfg("experiment=fed_shakespeare", "model=lstm_leaf", "out_dir=/tmp/x")
    model = dense_model(dict(cfg.model), "shakespeare", 65)
    H, E, V = 256, 8, 65
    by_hand = V * E + (4 * H * E + 4 * H + 4 * H * H) + (4 * H * H + 4 * H + 4 * H * H) + (H * V + V)
    assert sum(p.numel() for p in model.parameters()) == by_hand  # one bias per gate (nn.LSTM has two)


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="needs ../shared/data/tinyshakespeare.txt")
def test_experiment_takes_100_roles_and_samples_10_per_round():
    from fedlowrank.config import federated_run_from_cfg
    from fedlowrank.runtime.inprocess import InProcessGrid, make_strategy

    run = federated_run_from_cfg(compose_cfg("experiment=fed_shakespeare", f"data.path={SHAKESPEARE}",
                                             "out_dir=/tmp/x"))
    fd = fed_data(run)
    assert len(fd.train_parts) == run.fed.num_clients == 100
    assert min(len(p) for p in fd.train_parts) >= 20
    ys = fd.test.tensors[1]
    assert ((ys != IGNORE).sum(1) == 1).all() and (ys[:, -1] != IGNORE).all()  # one scored character per window
    strategy, grid = make_strategy(run), InProcessGrid(run)
    rounds = [{m.content["config"]["partition-id"] for m in strategy.configure_train(r, None, None, grid)}
              for r in (1, 2)]
    assert [len(r) for r in rounds] == [10, 10] and rounds[0] != rounds[1]  # 10 of 100, drawn afresh each round
