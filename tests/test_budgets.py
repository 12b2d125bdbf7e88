"""Client budgets: FedLMT's rank ratio, the parameter-ratio unit (``fed.budget_unit=params``), and listed budgets
that would have no client."""
import numpy as np
import pytest
import torch
from helpers import fed_run

from fedlowrank.config import ConfigError
from fedlowrank.federated.client import check_budget, model_from_state
from fedlowrank.federated.methods import fed_method
from fedlowrank.federated.task import build_model
from fedlowrank.lowrank import count_params, lowrank_modules
from fedlowrank.lowrank.layers import rank_from_budget


@pytest.mark.parametrize("m,n", [(128, 64), (64, 128), (100, 100), (10, 1000), (3, 5)])
@pytest.mark.parametrize("p", [0.05, 0.1, 0.25, 0.5, 1.0])
def test_params_rank_is_the_largest_that_fits(m, n, p):
    r = rank_from_budget(min(m, n), params=p, dims=(m, n))
    assert 1 <= r <= min(m, n)
    assert (m + n) * r <= p * m * n + 1e-9 or r == 1  # fits (rank 1 is the floor)
    assert r == min(m, n) or (m + n) * (r + 1) > p * m * n  # and one more slot would not
    with pytest.raises(ValueError, match="dims"):
        rank_from_budget(min(m, n), params=p)


def _factor_params(model) -> dict[str, tuple[int, int, int]]:
    """Per factorized layer: (U and V parameters, m, n)."""
    return {k: (layer.U.numel() + layer.V.numel(), layer.U.shape[0], layer.V.shape[1])
            for k, layer in lowrank_modules(model).items()}


def test_params_budgets_never_exceed_their_share_of_the_dense_layers(tmp_path):
    run = fed_run(tmp_path, "fed.num_clients=4", "fed.budget_unit=params")
    method = fed_method(run)
    g = method.initial_state()
    dense = count_params(build_model(run))
    for i, p in enumerate(run.fed.rank_ratios):
        assert run.fed.budget(i) == {"params": p}
        model = model_from_state(run, method.view(g, run.fed.budget(i)))
        check_budget(model, run.fed.budget(i))
        for name, (held, m, n) in _factor_params(model).items():
            assert held <= p * m * n, (name, p)
    assert count_params(model) <= dense  # budget 1.0: no larger than the dense model
    # FedLMT's rank ratio at 1.0 holds (m + n)·min(m, n) > m·n: larger than the dense model (the documented contrast)
    rank_run = fed_run(tmp_path, "fed.num_clients=4")
    rm = fed_method(rank_run)
    assert count_params(model_from_state(rank_run, rm.view(rm.initial_state(), {"ratio": 1.0}))) > dense


def test_params_global_model_is_the_best_rank_r_approximation_of_the_dense_start(tmp_path):
    run = fed_run(tmp_path, "fed.num_clients=4", "fed.budget_unit=params")
    g = fed_method(run).initial_state()
    torch.manual_seed(run.seed)
    dense = build_model(run).state_dict()
    for key in [k for k in g if k.endswith(".U")]:
        p = key[:-2]
        W = dense[f"{p}.weight"].double().numpy()  # (m, n)
        r = g[key].shape[1]
        assert r == rank_from_budget(min(W.shape), params=1.0, dims=W.shape)
        u, s, vt = np.linalg.svd(W, full_matrices=False)
        best = (u[:, :r] * s[:r]) @ vt[:r]
        got = (g[f"{p}.U"].double() @ g[f"{p}.V"].double()).numpy()
        assert np.abs(got - best).max() < 1e-5 * np.abs(W).max()


def test_client_refuses_a_model_over_its_params_budget(tmp_path):
    run = fed_run(tmp_path, "fed.num_clients=4", "fed.budget_unit=params")
    method = fed_method(run)
    big = model_from_state(run, method.view(method.initial_state(), {"params": 1.0}))
    with pytest.raises(ValueError, match="budget"):
        check_budget(big, {"params": 0.25})


def test_more_budgets_than_clients_names_the_dropped_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"\[0.5,1.0\] would have no client.*fed.num_clients=4 or fed.rank_ratios=\[0.1,0.25\]"):
        fed_run(tmp_path, "fed.num_clients=2")
    with pytest.raises(ConfigError, match=r"fed.ranks=\[2,4,8\].*\[8\] would have no client"):
        fed_run(tmp_path, "fed.num_clients=2", "fed.ranks=[2,4,8]")
    assert fed_run(tmp_path, "fed.num_clients=2", "strategy=fedavg").fed.num_clients == 2  # dense: no budgets
    assert fed_run(tmp_path, "fed.num_clients=2", "fed.rank_ratios=[0.25,1.0]").fed.budget(1) == {"ratio": 1.0}


@pytest.mark.parametrize("extra,match", [
    (["fed.ranks=[2,4,8,16]"], "fed.ranks are absolute ranks"),
    (["experiment=fed_relora"], "method=relora sizes its own"),
    (["fed.budget_unit=bytes"], "fed.budget_unit must be one of"),
])
def test_params_unit_refuses_what_it_cannot_size(tmp_path, extra, match):
    unit = [] if any("budget_unit" in e for e in extra) else ["fed.budget_unit=params"]
    with pytest.raises(ConfigError, match=match):
        fed_run(tmp_path, "fed.num_clients=4", *unit, *extra)
