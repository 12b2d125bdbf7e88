"""FedProx (``fed.prox_mu``): the client's objective gains mu/2 ||w - w_downloaded||^2 (Li et al. 2020). Checked
against an independent SGD loop whose proximal gradient mu (w - w0) is written out by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedlowrank.training.loop import train_classifier


def _setup():
    torch.manual_seed(0)
    x, y = torch.randn(24, 5), torch.randint(0, 3, (24,))
    model = nn.Linear(5, 3)
    return model, DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False), x, y


@pytest.mark.parametrize("mu", [0.0, 0.5, 3.0])
def test_proximal_term_matches_a_hand_written_sgd_loop(mu):
    model, loader, x, y = _setup()
    w0 = [p.detach().numpy().astype(np.float64).copy() for p in model.parameters()]
    ref = [w.copy() for w in w0]
    lr = 0.1
    for i in range(0, 24, 8):  # plain SGD: gradient of the cross-entropy (autograd) + mu (w - w0) (by hand)
        probe = nn.Linear(5, 3)
        with torch.no_grad():
            probe.weight.copy_(torch.from_numpy(ref[0]).float())
            probe.bias.copy_(torch.from_numpy(ref[1]).float())
        F.cross_entropy(probe(x[i:i + 8]), y[i:i + 8]).backward()
        grads = [probe.weight.grad.double().numpy(), probe.bias.grad.double().numpy()]
        ref = [w - lr * (g + mu * (w - a)) for w, g, a in zip(ref, grads, w0)]
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    train_classifier(model, loader, opt, epochs=1, prox_mu=mu)
    for p, r in zip(model.parameters(), ref):
        np.testing.assert_allclose(p.detach().double().numpy(), r, rtol=1e-5, atol=1e-6)


def test_a_large_mu_keeps_the_update_near_the_download():
    model, loader, _, _ = _setup()
    start = torch.cat([p.detach().flatten() for p in model.parameters()])
    moved = []
    for mu in (0.0, 5.0):
        m = nn.Linear(5, 3)
        m.load_state_dict(model.state_dict())
        train_classifier(m, loader, torch.optim.SGD(m.parameters(), lr=0.1), epochs=3, prox_mu=mu)
        moved.append(float((torch.cat([p.detach().flatten() for p in m.parameters()]) - start).norm()))
    assert moved[1] < 0.6 * moved[0]


def test_prox_mu_is_validated_and_reaches_the_client(tmp_path, monkeypatch):
    from helpers import compose_cfg

    from fedlowrank.config import ConfigError, federated_run_from_cfg
    from fedlowrank.federated import client

    with pytest.raises(ConfigError, match="fed.prox_mu must be >= 0"):
        federated_run_from_cfg(compose_cfg("mode=federated", "fed.prox_mu=-0.1", f"out_dir={tmp_path}"))
    run = federated_run_from_cfg(compose_cfg("mode=federated", "fed.prox_mu=0.25", "fed.local_steps=1",
                                             f"out_dir={tmp_path}"))
    seen = []
    real = client.train_classifier
    monkeypatch.setattr(client, "train_classifier", lambda *a, **k: seen.append(k["prox_mu"]) or real(*a, **k))
    from fedlowrank.runtime.inprocess import InProcessGrid, make_strategy, run_rounds

    run_rounds(make_strategy(run), InProcessGrid(run), 1)
    assert seen == [0.25] * run.fed.num_clients
