"""The screen's batched evaluation (:mod:`fedlowrank.federated.screen_eval`): the leave-one-out aggregates of one
budget evaluated by one ``vmap`` give the losses one model at a time gives, and the screen keeps to one model at
a time wherever the batched path disagrees or cannot run."""
from __future__ import annotations

import pytest
import torch
from helpers import fed_run

from fedlowrank.federated import screen_eval
from fedlowrank.federated.client import model_from_state
from fedlowrank.federated.screening import LooScreen
from fedlowrank.runtime.inprocess import InProcessGrid, make_strategy
from fedlowrank.training.loop import eval_sums, evaluate_classifier, mean_loss_accuracy

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_batched_losses_equal_one_model_at_a_time(tmp_path, model):
    """Against evaluate_classifier on a freshly built model per state: 5 different states, every budget."""
    run = fed_run(tmp_path, "fed.num_clients=4", f"model={model}")
    st = make_strategy(run)
    loo = LooScreen(run, st.method)
    torch.manual_seed(0)
    states = [{k: v + 0.1 * i * torch.randn_like(v) if v.is_floating_point() else v
               for k, v in st.global_state.items()} for i in range(5)]
    for b in loo.budgets:
        views = [st.method.view(s, b) for s in states]
        want = [evaluate_classifier(model_from_state(run, v), loo.loader)["loss"] for v in views]
        assert len(set(want)) == 5
        got = screen_eval.stacked_losses(loo.model(views[0]), views, loo.loader)
        assert got == pytest.approx(want, rel=1e-5)
        assert loo.stacked(views) == pytest.approx(want, rel=1e-5)
    assert loo.stacked.batched is True


def test_batchnorm_is_judged_with_each_batchs_own_statistics_and_left_unchanged(tmp_path):
    """ResNet (BatchNorm), its smallest budget's view: the screen's loss is the model's with each batch normalized
    by its own statistics (torch's training-mode BatchNorm on a separate copy), not with the aggregated running
    statistics (shifted here, so those give another loss); the evaluation leaves the buffers as loaded, and the
    batched path gives the same losses."""
    run = fed_run(tmp_path, "fed.num_clients=4", "model=resnet")
    st = make_strategy(run)
    loo = LooScreen(run, st.method)
    b = loo.budgets[0]
    torch.manual_seed(0)
    states = [{k: (v + 3.0 if "running_mean" in k else v + 0.05 * i * torch.randn_like(v)) if v.is_floating_point()
               else v for k, v in st.global_state.items()} for i in range(3)]
    view = st.method.view(states[0], b)
    ref = model_from_state(run, view).train()
    with torch.no_grad():
        want = mean_loss_accuracy(sum(eval_sums(ref(x), y) for x, y in loo.loader))["loss"]
    got = loo.losses(states[0], [b])[0]
    assert got == pytest.approx(want, rel=1e-6)
    running = evaluate_classifier(model_from_state(run, view), loo.loader)["loss"]
    assert abs(got - running) > 1e-3 * abs(running)  # the running statistics would have given another loss
    m = loo.model(view)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    evaluate_classifier(m, loo.loader)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    views = [st.method.view(s, b) for s in states]
    assert loo.stacked(views) == pytest.approx([loo.losses(s, [b])[0] for s in states], rel=1e-5)


def test_the_screen_keeps_to_one_model_at_a_time_where_the_batched_path_disagrees_or_fails(tmp_path, monkeypatch):
    """A batched path that returns other numbers (or raises) is caught on first use: the losses returned are the
    one-by-one ones, then and every later call."""
    run = fed_run(tmp_path, "fed.num_clients=4")
    st = make_strategy(run)
    torch.manual_seed(0)
    states = [{k: v + 0.1 * i * torch.randn_like(v) for k, v in st.global_state.items()} for i in range(3)]
    for broken in (lambda model, s, loader: [0.0] * len(s),
                   lambda model, s, loader: (_ for _ in ()).throw(RuntimeError("vmap: unsupported op"))):
        loo = LooScreen(run, st.method)
        want = loo.stacked.one_by_one(states)
        monkeypatch.setattr(screen_eval, "stacked_losses", broken)
        assert loo.stacked(states) == want and loo.stacked.batched is False
        assert loo.stacked(states) == want
        monkeypatch.undo()


def test_leave_one_out_table_batched_equals_one_model_at_a_time(tmp_path):
    """The round's table of rises (n + 1 aggregates at every held budget) is the same either way, to rounding."""
    run = fed_run(tmp_path, "fed.num_clients=5", "fed.local_steps=3")
    st = make_strategy(run)
    grid = InProcessGrid(run)
    replies = grid.send_and_receive(list(st.configure_train(1, None, None, grid)))
    valid = st._collect(1, replies)[0]
    assert len(valid) == 5
    batched = LooScreen(run, st.method)
    table = batched.table(valid, st._combine)
    assert batched.stacked.batched is True
    single = LooScreen(run, st.method)
    single.stacked.batched = False
    want = single.table(valid, st._combine)
    assert [b for _, b in table] == [b for _, b in want]
    assert [r for r, _ in table] == pytest.approx([r for r, _ in want], rel=1e-4, abs=1e-6)
    assert len({round(r, 6) for r, _ in want}) > 1


def test_the_screen_leaves_each_client_out_in_closed_form_with_the_same_table(tmp_path):
    """Under the default rule the screen aggregates the round once per leave-one-out pass (the n aggregates without
    each client come from :func:`.aggregation.without_each`), and its decisions and table are those of combining
    each subset; a method without a closed form combines each subset."""
    run = fed_run(tmp_path, "fed.num_clients=5", "fed.local_steps=3")
    st = make_strategy(run)
    grid = InProcessGrid(run)
    valid = st._collect(1, grid.send_and_receive(list(st.configure_train(1, None, None, grid))))[0]
    calls = []

    def counting(entries):
        calls.append(len(entries))
        return st._combine(entries)

    kept, gone, back = st.screen.round(1, valid, counting, st.global_state)
    assert len(kept) == 5 and gone == [] and back is None
    assert calls == [5]  # the full aggregate only: the n without-one aggregates came in closed form
    fast = st.screen._loo.table(valid, counting)
    single = LooScreen(run, st.method)  # no closed form wired in: combines each subset
    calls.clear()
    want = single.table(valid, counting)
    assert calls == [5] + [4] * 5
    assert [b for _, b in fast] == [b for _, b in want]
    assert [r for r, _ in fast] == pytest.approx([r for r, _ in want], rel=1e-5, abs=1e-6)
    assert len({round(r, 6) for r, _ in want}) > 1


def test_the_batched_vit_evaluation_prints_no_vmap_fallback_warning(tmp_path):
    """vmap has no batching rule for CPU attention and warns at every call; the screen's batched losses for the ViT
    (still checked against one model at a time) must not print it into every ViT run's console."""
    import warnings

    run = fed_run(tmp_path, "fed.num_clients=4", "model=vit")
    st = make_strategy(run)
    loo = LooScreen(run, st.method)
    view = st.method.view(st.global_state, loo.budgets[-1])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = screen_eval.stacked_losses(loo.model(view), [view, view], loo.loader)
    assert got[0] == pytest.approx(evaluate_classifier(model_from_state(run, view), loo.loader)["loss"], rel=1e-5)
    assert not [w for w in seen if "batching rule" in str(w.message)], [str(w.message)[:80] for w in seen]
