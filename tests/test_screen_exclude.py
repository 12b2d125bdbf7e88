"""The default defence (``fed.screen=exclude``, no clipping): a reply whose inclusion raises the server sample's loss
by more than ``fed.screen_nats`` is rejected and its sender excluded for the rest of the run; honest clients of
the default run are untouched; ``auto`` resolves per run; the exclusions survive a resume and are checked there."""
import json
from types import SimpleNamespace

import pytest
import torch
from helpers import fed_run

from fedlowrank.config import ConfigError
from fedlowrank.federated.resume import check_strategy_state
from fedlowrank.federated.screening import LooScreen, Screen
from fedlowrank.runtime.inprocess import InProcessGrid, make_strategy, run_rounds

pytestmark = pytest.mark.timeout(300)
COMMON = ["fed.num_clients=4", "fed.local_steps=3"]


def _run(path, rounds, *extra, common=COMMON):
    run = fed_run(path, *common, f"fed.rounds={rounds}", *extra)
    st = make_strategy(run)
    run_rounds(st, InProcessGrid(run), rounds)
    return st


def test_auto_defaults_resolve_per_run():
    run = fed_run("/tmp/x")
    assert (run.fed.screen, run.fed.clip_auto) == ("exclude", None)  # digits holds 10 % of each client out
    run = fed_run("/tmp/x", "fed.client_holdout=0")  # no held-out split to draw the server's sample from
    assert (run.fed.screen, run.fed.clip_auto) == ("none", 1.5)
    run = fed_run("/tmp/x", "data=synthetic", "fed.partition=natural")  # honest rises reach 1e10 nats there
    assert (run.fed.screen, run.fed.clip_auto) == ("none", 1.5)
    run = fed_run("/tmp/x", "fed.screen=none")
    assert run.fed.clip_auto == 1.5  # no screen: clipping stays on
    run = fed_run("/tmp/x", "fed.clip_auto=2", "fed.screen=loo")
    assert (run.fed.screen, run.fed.clip_auto) == ("loo", 2.0)
    # the clients' rate by model: the CNN's honest rounds blow up at the MLP's 0.05, and the screen excludes them
    assert [fed_run("/tmp/x", f"model={m}").fed.lr for m in ("mlp", "cnn", "vgg", "vit", "resnet")] == \
        [0.05, 0.02, 0.02, 0.01, 0.05]
    assert fed_run("/tmp/x", "model=cnn", "fed.lr=0.1").fed.lr == 0.1  # an explicit rate wins
    # the rollback by model: the ViT loses more by undone rounds than reversed changes cost it
    assert [fed_run("/tmp/x", f"model={m}").fed.screen_rollback for m in ("mlp", "cnn", "vit")] == [5, 5, 1]
    assert fed_run("/tmp/x", "model=vit", "fed.screen_rollback=3").fed.screen_rollback == 3
    for bad in ("fed.screen=krum", "fed.clip_auto=0.5", "fed.clip_auto=often", "fed.screen_nats=0",
                "fed.screen_rollback=-1", "fed.screen_rollback=1.5", "fed.screen_rollback=often", "fed.lr=fast",
                "fed.lr=0", "fed.lr=true"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            fed_run("/tmp/x", bad)


@pytest.mark.parametrize("strategy", ["slice", "fedavg"])
def test_default_defence_leaves_a_clean_run_bit_identical_to_no_defence(tmp_path, strategy):
    """Catches a default that clips or rejects honest clients (clipping at 1.5 scales some of these updates).
    The default local training (3 epochs), 3 rounds; the default rule and dense FedAvg."""
    rule = f"strategy={strategy}"
    st = _run(tmp_path / "d", 3, rule, common=[])
    ref = _run(tmp_path / "n", 3, rule, "fed.screen=none", "fed.clip_auto=null", common=[])
    assert st.rejections == [] and st.screen.excluded == {}
    assert all(torch.equal(st.global_state[k], ref.global_state[k]) for k in ref.global_state)
    clipped = _run(tmp_path / "c", 3, rule, "fed.screen=none", "fed.clip_auto=1.5", common=[])
    assert any(not torch.equal(clipped.global_state[k], ref.global_state[k]) for k in ref.global_state)


def test_a_hostile_client_is_rejected_excluded_and_the_rest_aggregated_exactly(tmp_path, caplog):
    """A constant reply from the only full-rank client: rejected in round 1 and never asked to train again;
    the model equals the run where that client crashes instead (the three others, as usual) cut to budget 0.5,
    the largest left: the rank slots above it, which only the excluded client trained, are zero."""
    st = _run(tmp_path / "a", 2, 'fed.faults=["3:constant"]')
    said = [r.getMessage() for r in caplog.records if "client" in r.getMessage()]
    assert any(m.startswith("round 1: rejected the update of client 3 and excluded it") for m in said), said
    ref = _run(tmp_path / "r", 2, 'fed.faults=["3:crash"]')
    assert st.screen.excluded == {3: 1} and st.rejections == [(1, 3)]
    assert sorted(st.partition[n] for n in st.sent) == [0, 1, 2]  # round 2: not even asked to train
    assert [h["clients_ok"] for h in st.history] == [3, 3]
    _assert_cut_to_half(st, ref)
    assert st.state()["excluded"] == {"3": 1}


def _assert_cut_to_half(st, ref):
    """``st``'s model is ``ref``'s cut to budget 0.5, zero-padded (the slots above it are zero)."""
    view = st.method.view(ref.global_state, {"ratio": 0.5})
    assert any(v.shape != ref.global_state[k].shape for k, v in view.items())
    for k, t in st.global_state.items():
        region = tuple(slice(0, n) for n in view[k].shape)
        assert torch.equal(t[region], view[k]), k
        rest = t.clone()
        rest[region] = 0
        assert not rest.any(), k


def test_a_reply_no_honest_client_sends_excludes_its_sender(tmp_path):
    """Factors at twice the rank it was sent (rejected by shape before deserializing): excluded at once, its slots
    retired; a crash (no reply) is not a reason to exclude."""
    st = _run(tmp_path / "a", 2, 'fed.faults=["3:budget"]')
    ref = _run(tmp_path / "r", 2, 'fed.faults=["3:crash"]')
    assert st.screen.excluded == {3: 1} and st.rejections == [(1, 3)] and ref.screen.excluded == {}
    _assert_cut_to_half(st, ref)
    off = _run(tmp_path / "o", 1, 'fed.faults=["3:budget"]', "fed.screen=none")
    assert off.screen.excluded == {} and off.rejections == [(1, 3)]


def test_worst_client_is_judged_at_its_own_and_larger_budgets_in_nats():
    """Against hand-computed rises: client 0 (budget 0.1) raises the 0.1 model by 0.5 nats at most; client 1
    (budget 0.5) raises the 0.1 model by 3.0 (a smaller budget: not its own, ignored), the full one by 0.6 (a
    relative rule would say 1.5)."""
    s = object.__new__(LooScreen)
    s.budgets = [{"ratio": r} for r in (0.1, 0.5, 1.0)]
    s.stacked = SimpleNamespace(batched=False)  # one model at a time: ``losses`` is what the test gives
    s.run = fed_run("/tmp/x", "fed.num_clients=2", "fed.rank_ratios=[0.1,0.5]")
    assert s.held([(0,), (1,)]) == s.budgets[:2] and s.held([(0,)]) == s.budgets[:1]  # no one holds 1.0 here
    s.held = lambda valid: s.budgets  # as if a client of budget 1.0 were in the round
    table = {(0, 1): [1.0, 1.0, 1.0], (1,): [0.5, 1.2, 1.0], (0,): [-2.0, 0.7, 0.4]}
    s.losses = lambda state, budgets: table[state]
    combine = lambda valid: tuple(v[0] for v in valid)  # noqa: E731
    assert s.worst([(0,), (1,)], combine) == (1, pytest.approx(0.6), "ratio1.0")
    table[(0, 1)] = [1.0, float("inf"), 1.0]  # only with both is the 0.5 model broken: both are blamed, 0 first
    assert s.worst([(0,), (1,)], combine)[1] == float("inf")


def test_budgets_no_client_of_the_round_holds_are_not_judged():
    """With no full-rank client in the round, the 1.0 model (its top slots untrained) is not evaluated: client 1's
    rise of 5 nats there does not count, its 0.2 at 0.5 does."""
    s = object.__new__(LooScreen)
    s.budgets = [{"ratio": r} for r in (0.1, 0.5, 1.0)]
    s.stacked = SimpleNamespace(batched=False)  # one model at a time: ``losses`` is what the test gives
    s.run = fed_run("/tmp/x", "fed.num_clients=3", "fed.rank_ratios=[0.1,0.5,1.0]")
    asked = []
    table = {(0, 1): [1.0, 1.0, 6.0], (1,): [0.9, 0.9, 1.0], (0,): [1.0, 0.8, 1.0]}

    def losses(state, budgets):
        asked.append([b["ratio"] for b in budgets])
        return table[state][:len(budgets)]

    s.losses = losses
    combine = lambda valid: tuple(v[0] for v in valid)  # noqa: E731
    assert s.worst([(0,), (1,)], combine) == (1, pytest.approx(0.2), "ratio0.5")
    assert asked and all(a == [0.1, 0.5] for a in asked)


def test_exclusion_needs_four_valid_clients_and_among_three_rejects_for_the_round():
    """Worst first: of 5 clients, the two far above the bound are excluded (5 and 4 judged); among the 3 left the
    third above the bound is rejected for this round but not excluded; clients below the bound stay."""
    screen = object.__new__(Screen)
    screen.run = SimpleNamespace(fed=SimpleNamespace(screen="exclude", screen_nats=2.0, screen_cusum=None))
    screen.method, screen.excluded, screen.cusum = None, {}, {}
    rise = {0: 50.0, 1: 0.1, 2: 9.0, 3: 3.0, 4: 0.2}  # partition id -> its loss rise (nats)

    def worst(valid, combine, table=None):
        i = max(range(len(valid)), key=lambda j: rise[valid[j][0]])
        return i, rise[valid[i][0]], "ratio1.0"

    screen._loo = SimpleNamespace(worst=worst)
    kept, gone = screen.apply(1, [(p,) for p in range(5)], None)
    assert gone == [0, 2, 3] and [k[0] for k in kept] == [1, 4] and screen.excluded == {0: 1, 2: 1}
    screen.excluded = {}
    kept, gone = screen.apply(1, [(p,) for p in (1, 2, 4)], None)
    assert gone == [2] and [k[0] for k in kept] == [1, 4] and screen.excluded == {}
    kept, gone = screen.apply(1, [(p,) for p in (1, 4)], None)  # two: nothing to compare with
    assert gone == [] and len(kept) == 2
    screen.excluded = {4: 1}  # a reply from a client excluded earlier (never sampled again) is dropped unjudged
    kept, gone = screen.apply(2, [(p,) for p in (1, 3, 4)], None)
    assert gone == [4] and [k[0] for k in kept] == [1, 3]


def test_planted_exclusions_are_refused_and_kept_ones_restored(tmp_path):
    run = fed_run(tmp_path, *COMMON, "fed.rounds=3")
    st = make_strategy(run)
    good = {**st.state(), "round": 2, "excluded": {"3": 1}}
    check_strategy_state(json.loads(json.dumps(good)), run, tmp_path / "strategy.json")
    st.restore(good, [])
    assert st.screen.excluded == {3: 1}
    for bad in ({"7": 1}, {"3": 3}, {"3": 0}, {"x": 1}, ["3"], {"3": 1.5}):
        with pytest.raises(Exception, match="excluded"):
            check_strategy_state({**good, "excluded": bad}, run, tmp_path / "strategy.json")


def test_the_screen_reloads_one_model_per_shape_and_judges_as_fresh_models_do(tmp_path):
    """The screen builds one model per budget and reloads it: its losses on two different global models, one after
    the other and back, equal those of models built afresh (a model not reloaded would repeat the first's)."""
    from fedlowrank.federated.client import model_from_state
    from fedlowrank.training.loop import evaluate_classifier

    run = fed_run(tmp_path, *COMMON)
    st = make_strategy(run)
    loo = LooScreen(run, st.method)
    g = st.global_state
    torch.manual_seed(0)
    other = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in g.items()}

    def fresh(state):
        return [evaluate_classifier(model_from_state(run, st.method.view(state, b)), loo.loader)["loss"]
                for b in loo.budgets]

    assert fresh(g) != fresh(other)
    for state in (g, other, g, other):
        assert loo.losses(state) == fresh(state)
    assert len(loo._skeletons) == len(loo.budgets) > 1


def test_a_round_without_cumulative_exclusion_runs_one_leave_one_out_pass():
    """The rises the cumulative rule computed are the first table the per-round rule judges (one pass of n + 1
    aggregates, not two); after a rejection the rest are judged again without it."""
    loo = object.__new__(LooScreen)
    calls = []
    rises = {0: 0.1, 1: 9.0, 2: 0.0, 3: 0.2, 4: 0.1}

    def table(valid, combine):
        calls.append([v[0] for v in valid])
        return [(rises[v[0]], "ratio1.0") for v in valid]

    loo.table = table
    screen = object.__new__(Screen)
    screen.run = SimpleNamespace(strategy="slice",
                                 fed=SimpleNamespace(screen="exclude", screen_nats=2.0, screen_cusum=50.0))
    screen.method, screen.excluded, screen.cusum, screen._loo = None, {}, {}, loo
    zero = {"w": torch.zeros(2)}
    kept, gone = screen.apply(1, [(p, {"w": torch.ones(2)}, 1.0, {}, zero) for p in range(5)], None)
    assert gone == [1] and [v[0] for v in kept] == [0, 2, 3, 4]
    assert calls == [[0, 1, 2, 3, 4], [0, 2, 3, 4]]
