"""Attacks that pass the per-reply checks, injected through the real client path (``fed.faults``), and the value
bound relative to what a client downloaded (``fed.max_abs_ratio``)."""
import pytest
import torch
from helpers import fed_run

from fedlowrank.config import ConfigError
from fedlowrank.federated.client import local_train
from fedlowrank.federated.methods import fed_method
from fedlowrank.federated.robust import RejectedReply, check_values, value_bounds
from fedlowrank.runtime.inprocess import InProcessGrid, make_strategy, run_rounds


def test_value_bounds_follow_the_download():
    view = {"a": torch.tensor([0.5, -2.0]), "z": torch.zeros(3), "i": torch.tensor([3])}
    b = value_bounds(view, max_abs=1e4, max_ratio=100.0)
    assert b == {"a": 200.0, "z": 200.0}  # all zeros: the download's largest value (2.0) sets the scale
    assert value_bounds(view, max_abs=150.0, max_ratio=100.0) == {"a": 150.0, "z": 150.0}  # never above max_abs
    assert value_bounds({"z": torch.zeros(2)}, 1e4, 100.0) == {"z": 1e4}
    check_values({"a": torch.tensor([199.0, 0.0])}, {}, 1e4, b)
    with pytest.raises(RejectedReply, match="a has values of magnitude 201 > 200 \\(fed.max_abs_ratio"):
        check_values({"a": torch.tensor([201.0, 0.0])}, {}, 1e4, b)
    with pytest.raises(RejectedReply, match="fresh has values of magnitude 2e\\+04 > 1e\\+04$"):
        check_values({"fresh": torch.tensor([2e4])}, {}, 1e4, b)  # not downloaded: the absolute bound
    with pytest.raises(ConfigError, match="fed.max_abs_ratio"):
        fed_run("/tmp/x", "fed.max_abs_ratio=0")


def _reply(tmp_path, fault: str | None):
    extra = [f'fed.faults=["3:{fault}"]'] if fault else []
    run = fed_run(tmp_path, "fed.num_clients=4", "fed.local_steps=3", *extra)
    method = fed_method(run)
    view = method.view(method.initial_state(), run.fed.budget(3))
    return view, local_train(run, 3, 4, view, 1)[0], run


@pytest.mark.parametrize("fault,k", [("flip", 1.0), ("flip1.4", 1.4), ("flip5", 5.0), ("scale", -100.0)])
def test_reversed_and_scaled_changes_are_the_honest_change_times_minus_k(tmp_path, fault, k):
    view, honest, _ = _reply(tmp_path, None)
    _, bad, _ = _reply(tmp_path, fault)  # the same seed: the same local training, then the fault
    for key, h in honest.items():
        want = view[key] - k * (h - view[key])
        assert torch.allclose(bad[key], want, rtol=1e-6, atol=1e-6), key
        assert not torch.allclose(bad[key], h), key


def test_constant_reply_sits_just_under_each_bound_and_passes_the_value_check(tmp_path):
    view, bad, run = _reply(tmp_path, "constant")
    bounds = value_bounds(view, run.fed.max_abs_value, run.fed.max_abs_ratio)
    for key, t in bad.items():
        assert torch.all(t == torch.tensor(0.99 * bounds[key], dtype=t.dtype)), key
    check_values(bad, {k: v.dtype for k, v in view.items()}, run.fed.max_abs_value, bounds)


def test_a_duplicated_reply_is_delivered_twice_and_counted_once(tmp_path):
    run = fed_run(tmp_path, "fed.num_clients=4", "fed.local_steps=2", "fed.rounds=2", 'fed.faults=["2:duplicate"]')
    clean = fed_run(tmp_path / "c", "fed.num_clients=4", "fed.local_steps=2", "fed.rounds=2")
    grid = InProcessGrid(run)
    st = make_strategy(run)
    assert len(grid.send_and_receive(list(st.configure_train(1, None, None, grid)))) == 5
    st, ref = make_strategy(run), make_strategy(clean)
    run_rounds(st, InProcessGrid(run), 2)
    run_rounds(ref, InProcessGrid(clean), 2)
    assert st.rejections == [(1, 2), (2, 2)] and [h["clients_ok"] for h in st.history] == [4, 4]
    assert all(torch.equal(st.global_state[k], ref.global_state[k]) for k in ref.global_state)


def test_loo_screen_rejects_the_attacker_and_aggregates_exactly_the_others(tmp_path):
    """``fed.screen=loo``: a constant-valued reply raises the server sample's loss by orders of magnitude and is
    rejected; the round's model equals the aggregate of the three others (the attacker crashing instead)."""
    common = ["fed.num_clients=4", "fed.local_steps=2", "fed.rounds=1", "fed.clip_auto=null"]
    run = fed_run(tmp_path / "s", *common, "fed.screen=loo", "fed.screen_tolerance=1000", 'fed.faults=["2:constant"]')
    ref_run = fed_run(tmp_path / "r", *common, 'fed.faults=["2:crash"]')
    st, ref = make_strategy(run), make_strategy(ref_run)
    run_rounds(st, InProcessGrid(run), 1)
    run_rounds(ref, InProcessGrid(ref_run), 1)
    assert st.rejections == [(1, 2)] and st.history[-1]["clients_ok"] == 3
    assert all(torch.equal(st.global_state[k], ref.global_state[k]) for k in ref.global_state)


def test_loo_screen_judges_a_client_at_its_own_and_larger_budgets_only():
    from fedlowrank.federated.screening import LooScreen

    s = object.__new__(LooScreen)
    s.budgets = [{"ratio": r} for r in (0.1, 0.25, 0.5, 1.0)]
    full, without = [2.0, 1.0, 1.0, 1.5], [1.0, 1.0, 1.0, 1.0]
    top = lambda own: max(s.rises(full, without, own), key=lambda r: r[0])  # noqa: E731
    assert top({"ratio": 0.25}) == (0.5, {"ratio": 1.0})  # the 0.1 model's rise is not its
    assert top({"ratio": 0.1}) == (1.0, {"ratio": 0.1})
    with pytest.raises(ConfigError, match="fed.screen must be"):
        fed_run("/tmp/x", "fed.screen=krum")
