"""Paths no test exercised before: every vision model, Frobenius decay in training, WeLore
``from_ckpt``, ``merge_lora``, ``fraction_train < 1``, the server's post-aggregation finiteness
check and the client's budget check."""
import math

import pytest
import torch
from helpers import central_run
from helpers import fed_run as _run
from torch.utils.data import DataLoader, TensorDataset

from fedlowrank.central import launch
from fedlowrank.federated.client import local_train
from fedlowrank.runtime.inprocess import InProcessGrid, make_strategy, run_rounds
from fedlowrank.federated.methods import fed_method
from fedlowrank.federated.server import partition_sizes
from fedlowrank.lowrank import add_lora, frobenius_decay, lowrank_modules, merge_lora
from fedlowrank.models.build import build_lowrank_vision
from fedlowrank.training.loop import train_classifier


@pytest.mark.parametrize("arch, data", [("mlp", "digits"), ("cnn", "digits"), ("vgg", "cifar10"),
                                        ("resnet", "cifar10"), ("vit", "digits")])
def test_every_vision_model_builds_factorized_and_trains_a_step(arch, data):
    torch.manual_seed(0)
    model = build_lowrank_vision({"arch": arch, "family": "vision"}, data, ratio=0.5)
    assert lowrank_modules(model), f"{arch}: nothing factorized"
    c, s = (1, 8) if data == "digits" else (3, 32)
    x, y = torch.randn(8, c, s, s), torch.randint(0, 10, (8,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = train_classifier(model, DataLoader(TensorDataset(x, y), batch_size=8),
                             torch.optim.SGD(model.parameters(), lr=0.05), max_steps=1)
    assert stats["steps"] == 1 and math.isfinite(stats["loss"])
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items() if k.endswith(".U"))


def test_frobenius_decay_in_training_shrinks_the_product():
    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    norms = {}
    for lam in (0.0, 0.05):
        torch.manual_seed(1)
        model = build_lowrank_vision({"arch": "mlp", "family": "vision"}, "digits", ratio=0.5)
        start = float(frobenius_decay(model))
        train_classifier(model, DataLoader(TensorDataset(x, y), batch_size=16),
                         torch.optim.SGD(model.parameters(), lr=0.1), epochs=5, frob_decay=lam)
        norms[lam] = float(frobenius_decay(model))
    assert norms[0.05] < 0.9 * norms[0.0] and norms[0.05] < start


def test_merge_lora_folds_adapters_into_dense_weights():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    add_lora(model, r=2, alpha=4.0)
    for n, p in model.named_parameters():
        if "adapter" in n:
            torch.nn.init.normal_(p)  # B = 0 at init would make the merge trivial
    x = torch.randn(4, 6)
    with torch.no_grad():
        want = model(x)
        merged = merge_lora(model)
        got = model(x)
    assert len(merged) == 2 and torch.allclose(got, want, atol=1e-5)
    assert not any("adapter" in n for n, _ in model.named_parameters())


def test_welore_from_ckpt_compresses_a_saved_dense_model(tmp_path):
    dense = launch(central_run(tmp_path / "dense", "experiment=gpt2_full", "trainer.max_steps=6"))
    ckpt = tmp_path / "dense" / "checkpoints" / "last"
    res = launch(central_run(tmp_path / "w", "experiment=gpt2_full", "method=welore", f"method.from_ckpt={ckpt}",
                             "method.pretrain_steps=0", "trainer.max_steps=4", "method.target_reduction=0.3"))
    assert res["params"] < dense["params"] and res["trainable_params"] < res["params"]
    assert math.isfinite(res["final_eval"]["loss"])


def test_fraction_train_samples_that_share_of_clients(tmp_path):
    run = _run(tmp_path, "fed.num_clients=6", "fed.fraction_train=0.5", "fed.local_steps=1")
    st = make_strategy(run)
    run_rounds(st, InProcessGrid(run), 3)
    picked = [sorted(int(c["pid"]) for c in r["clients"]) for r in st.history]
    assert all(len(p) == 3 for p in picked) and len({tuple(p) for p in picked}) > 1


def test_server_never_publishes_a_non_finite_aggregate(tmp_path, monkeypatch):
    run = _run(tmp_path, "fed.local_steps=1")
    st = make_strategy(run)
    method = st.method
    before = {k: v.clone() for k, v in st.global_state.items()}
    monkeypatch.setattr(method, "aggregate",  # finite updates that overflow once combined
                        lambda g, ups, w, views=None: {k: v * float("inf") if v.is_floating_point() else v for k, v in g.items()})
    run_rounds(st, InProcessGrid(run), 1)
    assert all(torch.equal(before[k], v) for k, v in st.global_state.items())
    assert st.history[0]["clients_ok"] == 0 and st.history[0]["rejected"] == 5


def test_client_refuses_a_model_above_its_budget(tmp_path):
    run = _run(tmp_path, "fed.local_steps=1")
    full = fed_method(run).initial_state()  # factorized at the largest budget (1.0)
    with pytest.raises(ValueError, match="budget"):
        local_train(run, 0, run.fed.num_clients, full, 1)  # client 0's budget is 0.1


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_active_rank_trains_only_the_nested_leading_slots(kind):
    from fedlowrank.lowrank import LowRankConv2d, LowRankLinear

    torch.manual_seed(0)
    if kind == "linear":
        layer, x = LowRankLinear.from_dense(torch.nn.Linear(6, 5), rank=4), torch.randn(3, 6)
    else:
        layer, x = LowRankConv2d.from_dense(torch.nn.Conv2d(3, 5, 3), rank=4), torch.randn(2, 3, 6, 6)
    ref = type(layer).from_dense(layer.merge(), rank=4)  # same weights, independent module
    ref.load_state_dict(layer.state_dict())
    ref.truncate(2)
    layer.set_active_rank(2)
    torch.testing.assert_close(layer(x), ref(x))
    layer(x).square().sum().backward()
    assert layer.U.grad[:, 2:].abs().max() == 0 and layer.V.grad[2:].abs().max() == 0
    assert layer.U.grad[:, :2].abs().max() > 0
    layer.set_active_rank(None)
    assert layer(x).shape == ref(x).shape and layer.rank == 4
    with pytest.raises(ValueError):
        layer.set_active_rank(5)


def test_nested_sampler_draws_only_budgets_up_to_the_clients_own(tmp_path):
    import random

    from fedlowrank.federated.client import model_from_state, nested_sampler

    run = _run(tmp_path, "fed.nested=true", "fed.rank_ratios=[0.1,0.25,0.5,1.0]")
    model = model_from_state(run, fed_method(run).view(fed_method(run).initial_state(), {"ratio": 0.5}))
    layers = lowrank_modules(model)
    step = nested_sampler(model, run, {"ratio": 0.5}, random.Random(0))
    seen = set()
    for i in range(60):
        step(i)
        seen.add(tuple(m.active_rank for m in layers.values()))
    from fedlowrank.lowrank.layers import rank_from_budget

    allowed = {tuple(min(m.rank, rank_from_budget(m.full_rank, ratio=p)) for m in layers.values()) for p in (0.1, 0.25, 0.5)}
    assert seen == allowed  # every budget up to 0.5 is drawn, nothing above it


def test_nested_needs_slice_or_product(tmp_path):
    from fedlowrank.config import ConfigError

    with pytest.raises(ConfigError, match="fed.nested"):
        _run(tmp_path, "fed.nested=true", "strategy=fedlmt")


def test_dense_fedavg_baseline_is_plain_fedavg_of_a_dense_model(tmp_path):
    run = _run(tmp_path, "strategy=fedavg", "fed.local_steps=3", "fed.num_clients=3")
    st = make_strategy(run)
    method = st.method
    assert not any(k.endswith(".U") for k in st.global_state)  # dense: nothing factorized
    g0 = {k: v.clone() for k, v in st.global_state.items()}
    grid = InProcessGrid(run)
    replies = grid.send_and_receive(list(st.configure_train(1, None, None, grid)))
    ups = [(st.partition[r.metadata.src_node_id], r.content["arrays"].to_torch_state_dict()) for r in replies]
    st.aggregate_train(1, replies)
    sizes = partition_sizes(run)
    tot = sum(sizes[p] for p, _ in ups)
    for k in g0:  # the example-weighted mean of the client models, computed independently
        want = sum(sizes[p] / tot * u[k].double() for p, u in ups)
        torch.testing.assert_close(st.global_state[k].double(), want, rtol=1e-5, atol=1e-6)
    assert not method.budget_views()
