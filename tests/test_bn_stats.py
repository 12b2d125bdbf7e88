"""BatchNorm statistics for the server's evaluations (:mod:`fedlowrank.federated.bn_stats`, ``fed.bn_stats``):
recomputed per evaluated view on the server's sample, checked against numpy on the captured BatchNorm inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import fed_run
from torch import nn

from fedlowrank.config import ConfigError
from fedlowrank.federated import bn_stats
from fedlowrank.federated.client import model_from_state
from fedlowrank.federated.screening import LooScreen
from fedlowrank.runtime.inprocess import make_strategy

pytestmark = pytest.mark.timeout(300)


def _bn_inputs(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, list[np.ndarray]]:
    """Each BatchNorm's input per batch, with every BatchNorm normalizing by the batch's own statistics (what each
    layer sees while statistics are computed for it) and every other layer in eval mode."""
    seen: dict[str, list[np.ndarray]] = {}
    model.eval()
    hooks = []
    for n, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats = False
            m.train()
            hooks.append(m.register_forward_hook(
                lambda mod, inp, out, n=n: seen.setdefault(n, []).append(inp[0].double().numpy())))
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in hooks:
        h.remove()
    return seen


def test_recomputed_statistics_are_the_per_batch_average_and_dropout_stays_off():
    """conv -> dropout -> BN, two batches of different sizes: running mean = the mean of the two batch means,
    running variance = the mean of the unbiased batch variances (numpy), old buffers forgotten, dropout off, the
    momentum restored and the model left in eval mode. Catches a forgotten reset, momentum 0.1 instead of the
    cumulative average, per-example instead of per-batch weighting, and dropout left on."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Dropout(0.5), nn.BatchNorm2d(3))
    model[2].running_mean.fill_(5.0)
    model[2].running_var.fill_(9.0)
    model[2].num_batches_tracked.fill_(10)  # as loaded from a trained state: the average must restart
    xs = [torch.randn(7, 1, 6, 6) * 2 + 1, torch.randn(3, 1, 6, 6) - 2]
    with torch.no_grad():
        h = [model[0](x).double().numpy() for x in xs]  # what the BN sees with dropout off
    bn_stats.recompute_batchnorm(model, xs)
    means = [a.mean(axis=(0, 2, 3)) for a in h]
    vars_ = [a.transpose(1, 0, 2, 3).reshape(3, -1).var(axis=1, ddof=1) for a in h]
    np.testing.assert_allclose(model[2].running_mean.double().numpy(), np.mean(means, axis=0), rtol=1e-5)
    np.testing.assert_allclose(model[2].running_var.double().numpy(), np.mean(vars_, axis=0), rtol=1e-5)
    assert model[2].momentum == 0.1 and not model.training and not model[2].training


def test_a_model_without_batchnorm_is_left_as_loaded(tmp_path):
    """MLP: eval_model gives the state's tensors unchanged, with fed.bn_stats=server as with aggregate."""
    run = fed_run(tmp_path, "fed.num_clients=4")
    assert run.fed.bn_stats == "server"  # auto, with held-out splits
    state = make_strategy(run).global_state
    got = bn_stats.eval_model(run, state).state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items())


def test_resnet_views_get_their_own_statistics_on_the_screens_sample(tmp_path):
    """ResNet, every budget view: the evaluated model's BatchNorm buffers equal numpy's statistics of that layer's
    inputs over the server's sample (the screen's very examples), the weights and the global state untouched;
    fed.bn_stats=aggregate keeps the uploaded buffers."""
    run = fed_run(tmp_path, "fed.num_clients=4", "model=resnet")
    st = make_strategy(run)
    state = {k: v + 3.0 if "running_mean" in k else v for k, v in st.global_state.items()}  # stale statistics
    before = {k: v.clone() for k, v in state.items()}
    sample = bn_stats.server_sample(run)
    assert torch.equal(sample.tensors[0], LooScreen(run, st.method).loader.tensors[0])
    xs = [sample.tensors[0][i:i + bn_stats.CALIBRATION_BATCH]
          for i in range(0, len(sample.tensors[0]), bn_stats.CALIBRATION_BATCH)]
    for b in LooScreen(run, st.method).budgets:
        view = st.method.view(state, b)
        model = bn_stats.eval_model(run, view)
        seen = _bn_inputs(model_from_state(run, view), xs)
        for name, m in model.named_modules():
            if isinstance(m, nn.BatchNorm2d):
                a = np.concatenate([t.transpose(1, 0, 2, 3).reshape(t.shape[1], -1) for t in seen[name]], axis=1)
                np.testing.assert_allclose(m.running_mean.double().numpy(), a.mean(axis=1), rtol=1e-4, atol=1e-6)
                np.testing.assert_allclose(m.running_var.double().numpy(), a.var(axis=1, ddof=1), rtol=1e-4)
        weights = {k: v for k, v in model.state_dict().items() if "running" not in k and "tracked" not in k}
        assert all(torch.equal(weights[k], view[k]) for k in weights)
    assert all(torch.equal(state[k], v) for k, v in before.items())
    run.fed.bn_stats = "aggregate"
    kept = bn_stats.eval_model(run, st.method.view(state, b)).state_dict()
    assert all(torch.equal(kept[k], v) for k, v in st.method.view(state, b).items())


def test_bn_stats_settings(tmp_path):
    """auto: server with held-out splits, aggregate without; server without them and unknown values refused."""
    assert fed_run(tmp_path, "fed.client_holdout=0").fed.bn_stats == "aggregate"
    assert fed_run(tmp_path, "fed.bn_stats=aggregate").fed.bn_stats == "aggregate"
    with pytest.raises(ConfigError, match="client_holdout"):
        fed_run(tmp_path, "fed.client_holdout=0", "fed.bn_stats=server")
    with pytest.raises(ConfigError, match="bn_stats must be one of"):
        fed_run(tmp_path, "fed.bn_stats=batch")
