"""Each aggregation rule against a hand computation; validation of client updates."""
import math

import pytest
import torch

from fedlowrank.federated.aggregation import (
    aggregate, budget_ranks, client_view, expected_shapes, factor_prefixes, validate_update,
)


def _global(R=3, m=4, n=5):
    return {"fc.U": torch.randn(m, R), "fc.V": torch.randn(R, n), "fc.bias": torch.randn(m),
            "head.weight": torch.randn(2, m), "bn.num_batches_tracked": torch.tensor(7)}


def _client(g, r):
    return {"fc.U": torch.randn(g["fc.U"].shape[0], r), "fc.V": torch.randn(r, g["fc.V"].shape[1]),
            "fc.bias": torch.randn_like(g["fc.bias"]), "head.weight": torch.randn_like(g["head.weight"]),
            "bn.num_batches_tracked": torch.tensor(9)}


def test_factor_prefixes_and_budget_ranks():
    g = _global(R=4, m=10, n=8)
    assert factor_prefixes(g) == ["fc"]
    assert budget_ranks(g, ratio=0.25) == {"fc": 2}  # ceil(0.25 * 8)
    assert budget_ranks(g, ratio=1.0) == {"fc": 4}  # capped at the global rank
    assert budget_ranks(g, rank=3) == {"fc": 3}


def test_fedlmt_is_fedavg_of_factors():
    g = _global()
    a, b = _client(g, 3), _client(g, 3)
    new = aggregate(g, [a, b], [1.0, 3.0], "fedlmt")
    for k in ("fc.U", "fc.V", "fc.bias", "head.weight"):
        assert torch.allclose(new[k], 0.25 * a[k] + 0.75 * b[k])
    assert int(new["bn.num_batches_tracked"]) == 9
    with pytest.raises(ValueError):
        aggregate(g, [_client(g, 2)], [1.0], "fedlmt")


def test_slice_averages_each_slot_over_its_trainers():
    g = _global(R=3)
    a, b = _client(g, 1), _client(g, 2)  # weights 2 and 6
    new = aggregate(g, [a, b], [2.0, 6.0], "slice")
    # slot 0: both clients; slot 1: only b; slot 2: nobody -> global kept
    assert torch.allclose(new["fc.U"][:, 0], (2 * a["fc.U"][:, 0] + 6 * b["fc.U"][:, 0]) / 8)
    assert torch.allclose(new["fc.V"][0], (2 * a["fc.V"][0] + 6 * b["fc.V"][0]) / 8)
    assert torch.allclose(new["fc.U"][:, 1], b["fc.U"][:, 1])
    assert torch.allclose(new["fc.V"][1], b["fc.V"][1])
    assert torch.equal(new["fc.U"][:, 2], g["fc.U"][:, 2]) and torch.equal(new["fc.V"][2], g["fc.V"][2])
    assert torch.allclose(new["fc.bias"], 0.25 * a["fc.bias"] + 0.75 * b["fc.bias"])


def test_product_is_best_rank_R_of_average_product():
    g = _global(R=3, m=8, n=9)
    cs = [_client(g, r) for r in (1, 2, 3)]
    w = [1.0, 1.0, 2.0]
    new = aggregate(g, cs, w, "product")
    avg = sum(wi * c["fc.U"] @ c["fc.V"] for wi, c in zip(w, cs)) / 4
    s = torch.linalg.svdvals(avg)
    err = (new["fc.U"] @ new["fc.V"] - avg).norm().item()
    assert math.isclose(err, s[3:].norm().item(), rel_tol=1e-4, abs_tol=1e-5)
    assert new["fc.U"].shape == (8, 3) and new["fc.V"].shape == (3, 9)
    # balanced factors: UᵀU == VVᵀ == diag(S)
    assert torch.allclose(new["fc.U"].T @ new["fc.U"], new["fc.V"] @ new["fc.V"].T, atol=1e-4)


def test_client_view_prefix_and_product_truncation():
    g = _global(R=4, m=6, n=7)
    v = client_view(g, {"fc": 2}, "slice")
    assert torch.equal(v["fc.U"], g["fc.U"][:, :2]) and torch.equal(v["fc.V"], g["fc.V"][:2])
    p = client_view(g, {"fc": 2}, "product")
    W = g["fc.U"] @ g["fc.V"]
    s = torch.linalg.svdvals(W)
    assert math.isclose((p["fc.U"] @ p["fc.V"] - W).norm().item(), s[2:].norm().item(), rel_tol=1e-4)
    assert torch.equal(v["head.weight"], g["head.weight"])


def test_validate_update_rejects_bad_replies():
    g = _global()
    exp = expected_shapes(client_view(g, {"fc": 2}, "slice"))
    good = _client(g, 2)
    assert validate_update(good, exp) is None
    nan = dict(good, **{"fc.U": good["fc.U"].clone().fill_(float("nan"))})
    assert "non-finite" in validate_update(nan, exp)
    assert "shape" in validate_update(_client(g, 3), exp)
    missing = {k: v for k, v in good.items() if k != "fc.bias"}
    assert "missing" in validate_update(missing, exp)
    inf = dict(good, **{"head.weight": good["head.weight"] * float("inf")})
    assert validate_update(inf, exp) is not None


def test_aggregate_rejects_bad_weights_and_rule():
    g = _global()
    with pytest.raises(ValueError):
        aggregate(g, [_client(g, 3)], [0.0], "slice")
    with pytest.raises(ValueError):
        aggregate(g, [_client(g, 3)], [1.0], "median")


def test_merge_adapters_folds_every_client_product_exactly():
    from fedlowrank.federated.aggregation import merge_adapters

    g = {"fc.weight": torch.randn(6, 5), "fc.bias": torch.randn(6), "head.weight": torch.randn(2, 6)}
    ups = []
    for r, s in ((1, 2.0), (3, 0.5)):  # heterogeneous adapter ranks and scalings
        ups.append({"fc.adapter.U": torch.randn(6, r), "fc.adapter.V": torch.randn(r, 5),
                    "fc.scaling": torch.tensor(s), "fc.base.bias": torch.randn(6)})
    new = merge_adapters(g, ups, [1.0, 3.0])
    expect = g["fc.weight"] + 0.25 * 2.0 * ups[0]["fc.adapter.U"] @ ups[0]["fc.adapter.V"] \
        + 0.75 * 0.5 * ups[1]["fc.adapter.U"] @ ups[1]["fc.adapter.V"]
    assert torch.allclose(new["fc.weight"], expect, atol=1e-6)
    assert torch.allclose(new["fc.bias"], 0.25 * ups[0]["fc.base.bias"] + 0.75 * ups[1]["fc.base.bias"])
    assert torch.equal(new["head.weight"], g["head.weight"])  # not trained: unchanged


@pytest.mark.parametrize("strategy,expect", [("fedlmt", 0.1), ("slice", 1.0), ("product", 1.0)])
def test_global_rank_is_the_smallest_budget_under_fedlmt(strategy, expect):
    """FedLMT trains one common rank every client can afford: the smallest budget."""
    from fedlowrank.config import federated_run_from_cfg
    from fedlowrank.federated.methods import fed_method
    from fedlowrank.federated.aggregation import layer_ranks
    from helpers import compose_cfg

    run = federated_run_from_cfg(compose_cfg("mode=federated", f"strategy={strategy}", "fed.num_clients=3",
                                             "fed.rank_ratios=[0.5,0.1,1.0]", "out_dir=unused"))
    method = fed_method(run)
    assert method.global_budget() == {"ratio": expect}
    state = method.initial_state()
    from fedlowrank.lowrank import rank_from_budget

    ranks = layer_ranks(state)
    assert ranks
    for name, r in ranks.items():  # every factorized layer built at that budget
        full = min(state[f"{name}.U"].shape[0], state[f"{name}.V"].shape[1])
        assert r == rank_from_budget(full, ratio=expect)


def test_product_with_views_aggregates_changes_against_a_dense_numpy_reference():
    import numpy as np

    torch.manual_seed(3)
    g = {"fc.U": torch.randn(7, 4, dtype=torch.float64), "fc.V": torch.randn(4, 6, dtype=torch.float64)}
    views = [client_view(g, {"fc": r}, "product") for r in (1, 2, 4)]
    ups = [{"fc.U": v["fc.U"] + 0.1 * torch.randn_like(v["fc.U"]), "fc.V": v["fc.V"] + 0.1 * torch.randn_like(v["fc.V"])}
           for v in views]
    w = [0.2, 0.3, 0.5]
    new = aggregate(g, ups, w, "product", views)
    G = (g["fc.U"] @ g["fc.V"]).numpy()
    W = G + sum(wi * (u["fc.U"] @ u["fc.V"] - v["fc.U"] @ v["fc.V"]).numpy() for wi, u, v in zip(w, ups, views))
    P, S, Qt = np.linalg.svd(W)
    best = (P[:, :4] * S[:4]) @ Qt[:4]
    np.testing.assert_allclose((new["fc.U"] @ new["fc.V"]).numpy(), best, atol=1e-9)
    # without the views it is the plain product average, which drops what small budgets never saw
    plain = aggregate(g, ups, w, "product")
    assert not torch.allclose(plain["fc.U"] @ plain["fc.V"], new["fc.U"] @ new["fc.V"], atol=1e-3)


def _slice_reference_without(g, ups, ws, j):
    """numpy float64, by hand: each rank slot averaged over the clients other than j that trained it (global value
    where none did); dense tensors weight-averaged over the others; ints from the first other client."""
    keep = [i for i in range(len(ups)) if i != j]
    out = {}
    for k in ("fc.bias", "head.weight"):
        out[k] = sum(ws[i] * ups[i][k].double().numpy() for i in keep) / sum(ws[i] for i in keep)
    out["bn.num_batches_tracked"] = ups[keep[0]]["bn.num_batches_tracked"].numpy()
    U, V = g["fc.U"].double().numpy().copy(), g["fc.V"].double().numpy().copy()
    for s in range(U.shape[1]):
        who = [i for i in keep if ups[i]["fc.U"].shape[1] > s]
        if who:
            tot = sum(ws[i] for i in who)
            U[:, s] = sum(ws[i] * ups[i]["fc.U"][:, s].double().numpy() for i in who) / tot
            V[s] = sum(ws[i] * ups[i]["fc.V"][s].double().numpy() for i in who) / tot
    out["fc.U"], out["fc.V"] = U, V
    return out


def _dense(state):
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


@pytest.mark.parametrize("rule", ["fedavg", "fedlmt", "slice"])
def test_without_each_is_the_aggregate_of_the_others(rule):
    """The closed form the screen uses equals aggregating the other updates, for every left-out client; under
    ``slice`` a slot only the left-out client trained keeps its global value exactly."""
    from fedlowrank.federated.aggregation import without_each

    torch.manual_seed(0)
    g = _global(R=4)
    ranks = [4, 4, 4] if rule == "fedlmt" else [1, 2, 4]
    ups, ws = [_client(g, r) for r in ranks], [3.0, 5.0, 2.0]
    ups[1]["bn.num_batches_tracked"] = torch.tensor(11)
    if rule == "fedavg":  # a dense model (with factors, fedavg combines their products: no closed form)
        assert without_each(g, ups, ws, rule) is None
        g, ups = _dense(g), [_dense(u) for u in ups]
    got = without_each(g, ups, ws, rule)
    for j in range(3):
        want = aggregate(g, ups[:j] + ups[j + 1:], ws[:j] + ws[j + 1:], rule)
        assert list(got[j]) == list(want)
        for k in want:
            assert got[j][k].dtype == want[k].dtype and torch.allclose(got[j][k], want[k], rtol=1e-6, atol=1e-6), k
    if rule == "slice":  # client 2 alone holds slots 2-3
        assert torch.equal(got[2]["fc.U"][:, 2:], g["fc.U"][:, 2:]) and torch.equal(got[2]["fc.V"][2:], g["fc.V"][2:])
        assert int(got[0]["bn.num_batches_tracked"]) == 11 and int(got[1]["bn.num_batches_tracked"]) == 9


def test_without_each_leaves_no_rounding_of_a_blown_up_update_behind():
    """A client sending values of 1e4 (an attack under the value bound): the aggregate without it matches a float64
    hand computation of the others to 1e-6 (sums taken in float32 and the attacker subtracted leave ~1e-3)."""
    from fedlowrank.federated.aggregation import without_each

    torch.manual_seed(1)
    g = _global(R=4)
    ups, ws = [_client(g, r) for r in (1, 2, 4, 4)], [3.0, 5.0, 2.0, 4.0]
    ups[3] = {k: v.fill_(9.9e3) if v.is_floating_point() else v for k, v in ups[3].items()}
    got = without_each(g, ups, ws, "slice")
    for j in range(4):
        want = _slice_reference_without(g, ups, ws, j)
        for k, v in want.items():
            assert abs(got[j][k].double().numpy() - v).max() <= 1e-6 * max(1.0, abs(v).max()), (j, k)


def test_without_each_has_no_closed_form_where_the_rule_has_none():
    from fedlowrank.federated.aggregation import without_each

    g = _global(R=4)
    ups = [_client(g, 2), _client(g, 4)]
    assert without_each(g, ups, [1.0, 1.0], "product") is None
    assert without_each(g, ups[:1], [1.0], "slice") is None  # nobody left
    assert without_each(g, ups, [1.0, 0.0], "slice") is None  # leaving client 0 out leaves no weight
