"""``fed.screen_rollback``: excluding a client takes the global model back to its state before the earliest round,
within reach, that aggregated the client's update; the round's other replies are set aside (they trained from the
model being undone); the memory survives a round checkpoint. The screen's judge is stubbed so that exactly one
client is excluded in a chosen round; training, aggregation and the strategy are the real ones."""
import json
from types import SimpleNamespace

import pytest
import torch
from helpers import fed_run

from fedlowrank.federated.resume import resume_point
from fedlowrank.federated.screening import Rollback
from fedlowrank.federated.server import _save_round
from fedlowrank.runtime.inprocess import InProcessGrid, make_strategy

pytestmark = pytest.mark.timeout(300)
COMMON = ["fed.num_clients=4", "fed.local_steps=3"]
HOSTILE, CAUGHT = 2, 3  # client 2 (budget 0.5, below the top one: no slots retired) is excluded in round 3


def _strategy(path, rounds, *extra):
    """A strategy whose screen excludes ``HOSTILE`` in round ``CAUGHT`` (a 10-nat rise) and nobody else (the
    cumulative rule off: the stub judges rounds, not sums)."""
    run = fed_run(path, *COMMON, f"fed.rounds={rounds}", "fed.screen_cusum=null", *extra)
    st = make_strategy(run)
    clock = {"round": 0}

    def worst(valid, combine, table=None):
        pids = [v[0] for v in valid]
        if clock["round"] == CAUGHT and HOSTILE in pids:
            return pids.index(HOSTILE), 10.0, "ratio0.5"
        return 0, -1.0, "ratio0.1"

    st.screen._loo = SimpleNamespace(worst=worst)
    return run, st, clock


def _rounds(st, run, clock, first, last) -> dict[int, dict]:
    """Rounds ``first``..``last``; the global model after each (cloned)."""
    grid, after = InProcessGrid(run), {}
    for rnd in range(first, last + 1):
        clock["round"] = rnd
        st.aggregate_train(rnd, grid.send_and_receive(list(st.configure_train(rnd, None, None, grid))))
        after[rnd] = {k: v.clone() for k, v in st.global_state.items()}
    return after


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_excluding_a_client_undoes_the_rounds_that_aggregated_it(tmp_path, caplog):
    """Catches a rollback that does nothing, goes back to the wrong round, keeps the round's other replies, counts
    the round as failed, or a remembered model changed in place by later rounds."""
    run, st, clock = _strategy(tmp_path / "a", 4)
    initial = {k: v.clone() for k, v in st.global_state.items()}
    after = _rounds(st, run, clock, 1, 4)
    assert _equal(after[3], initial)  # client 2 was aggregated in rounds 1 and 2: both undone
    assert not _equal(after[2], initial) and not _equal(after[4], after[3])  # rounds 2 and 4 did train
    assert st.screen.excluded == {HOSTILE: CAUGHT}
    assert sorted(st.rejections) == [(3, 0), (3, 1), (3, 2), (3, 3)]  # the 3 others set aside with it
    assert [h["clients_ok"] for h in st.history] == [4, 4, 0, 3] and st.failed_rounds == 0
    said = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("round 3: client(s) 2 had updates aggregated since round 1: the global model goes back "
                            "to its state before round 1") for m in said), said
    assert not any("no valid update" in m for m in said)

    run, st, clock = _strategy(tmp_path / "b", 3, "fed.screen_rollback=1")  # reaches one round back only
    after = _rounds(st, run, clock, 1, 3)
    assert _equal(after[3], after[1])

    run, st, clock = _strategy(tmp_path / "c", 3, "fed.screen_rollback=0")  # off: the others' round-3 replies count
    after = _rounds(st, run, clock, 1, 3)
    assert not _equal(after[3], after[2]) and not _equal(after[3], initial)
    assert st.rejections == [(3, HOSTILE)] and st.history[2]["clients_ok"] == 3


def test_rollback_memory_keeps_the_window_and_never_crosses_a_shape_change():
    rb = Rollback(2)
    for rnd in range(1, 5):
        rb.remember(rnd, {"w": torch.full((2,), float(rnd))})
        rb.aggregated_in(rnd, [0] if rnd < 4 else [1])
    assert sorted(rb.before) == [2, 3, 4] and rb.aggregated == {0: [1, 2, 3], 1: [4]}
    assert rb.point([0]) == 2 and rb.point([1]) == 4 and rb.point([5]) is None and rb.point([]) is None
    assert torch.equal(rb.before[2]["w"], torch.full((2,), 2.0))
    rb.aggregated_in(5, [0])
    assert rb.aggregated[0] == [3, 5]  # rounds out of reach are forgotten
    rb.remember(5, {"w": torch.zeros(3)})  # the model changed shape (rank growth): no way back across it
    assert sorted(rb.before) == [5] and rb.point([1]) is None
    assert set(rb.tensors({"w": torch.zeros(3)})) == {"5/w"} and rb.tensors({"w": torch.zeros(2)}) == {}


def test_the_rollback_memory_survives_a_round_checkpoint(tmp_path):
    """Resume is exact across a later rollback: the restored memory goes back to the same round and model."""
    run, st, clock = _strategy(tmp_path, 4, "fed.resume=auto")
    initial = {k: v.clone() for k, v in st.global_state.items()}
    _rounds(st, run, clock, 1, 2)
    with (tmp_path / "rounds.jsonl").open("w") as f:
        for h in st.history:
            f.write(json.dumps({"round": h["round"], "train": h}, default=float) + "\n")
    _save_round(tmp_path, run, 2, st.global_state, st.state(), None, st.screen.rollback.tensors(st.global_state))
    rnd, state, saved, history, _ = resume_point(tmp_path, run, initial)
    again = make_strategy(run)
    again.global_state = state
    again.restore(saved, history)
    assert rnd == 2 and again.screen.rollback.aggregated == st.screen.rollback.aggregated == {p: [1, 2] for p in
                                                                                               range(4)}
    back = again.screen.undo([HOSTILE])
    assert back[0] == 1 and _equal(back[1], initial) and _equal(again.screen.rollback.before[2],
                                                                st.screen.rollback.before[2])


def test_a_persistent_small_rise_accumulates_to_an_exclusion_and_an_alternating_one_does_not():
    """``fed.screen_cusum``: against hand-computed one-sided sums. Clients 1 and 3 change the model against the
    other three (cosine with the others' summed change about -1); 0, 2 and 4 along it. Client 3 raises the loss 0.2
    nats every round (never near ``fed.screen_nats``); client 1 alternates +0.3 / -0.3; client 2 raises it 1.0 once,
    along the others' change, then lowers it 0.1 a round. With a 0.5 bound client 3 is excluded in round 3
    (0.2 + 0.2 + 0.2 = 0.6), client 1 never (0.3, 0, 0.3, 0), client 2 never (an agreeing round counts at most
    ALONG_CAP = 0.3: 0.3, 0.2, 0.1; without the gate, on dense fedavg, 1.0 excludes it at once); among 3 replies
    nobody is excluded."""
    from fedlowrank.federated.screening import Screen

    screen = object.__new__(Screen)
    screen.run = SimpleNamespace(strategy="slice",
                                 fed=SimpleNamespace(screen="exclude", screen_nats=2.0, screen_cusum=0.5))
    screen.method, screen.excluded, screen.cusum = None, {}, {}
    rises = {0: [-0.1] * 4, 1: [0.3, -0.3, 0.3, -0.3], 2: [1.0, -0.1, -0.1, -0.1], 3: [0.2] * 4, 4: [0.0] * 4}
    along, against = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.1])
    zero = {"w": torch.zeros(2)}
    entry = lambda p: (p, {"w": against if p in (1, 3) else along}, 1.0, {}, zero)  # noqa: E731
    clock = {"round": 0}
    table = lambda valid, combine: [(rises[v[0]][clock["round"] - 1], "the whole model") for v in valid]  # noqa: E731
    screen._loo = SimpleNamespace(table=table, worst=lambda valid, combine, table=None: (0, -1.0, ""))
    for rnd in (1, 2, 3):
        clock["round"] = rnd
        kept, gone = screen.apply(rnd, [entry(p) for p in range(5)], None)
        assert (gone, screen.excluded) == (([3], {3: 3}) if rnd == 3 else ([], {})), rnd
    assert screen.cusum == pytest.approx({0: 0.0, 1: 0.3, 2: 0.1, 3: 0.6, 4: 0.0})
    screen.excluded, screen.cusum = {}, {3: 10.0}
    clock["round"] = 4
    kept, gone = screen.apply(4, [entry(p) for p in (1, 2, 3)], None)  # three: too few to exclude on
    assert gone == [] and screen.excluded == {}
    screen.run.strategy, screen.excluded, screen.cusum = "fedavg", {}, {}  # dense FedAvg: no direction gate
    clock["round"] = 1
    screen.apply(1, [entry(p) for p in range(5)], None)
    assert screen.excluded == {2: 1} and screen.cusum[2] == pytest.approx(1.0)
    screen.run.fed.screen_cusum = None  # off: sums are not kept
    screen.cusum = {}
    screen.apply(4, [entry(p) for p in range(5)], None)
    assert screen.cusum == {}


def test_on_dense_fedavg_a_reversed_change_is_excluded_by_its_cumulative_rise(tmp_path):
    """The default config with ``strategy=fedavg`` (``fed.screen_cusum`` resolves to 0.5 there): a reversed change
    (k = 1) from client 3 rises below ``fed.screen_nats`` and passes the per-round rule alone, but its cumulative sum
    excludes it in round 1; honest clients' sums stay below the bound."""
    from fedlowrank.runtime.inprocess import run_rounds

    def run_two(path, *extra):
        run = fed_run(path, "strategy=fedavg", "fed.rounds=2", 'fed.faults=["3:flip"]', *extra)
        st = make_strategy(run)
        run_rounds(st, InProcessGrid(run), 2)
        return run, st

    run, st = run_two(tmp_path / "a")
    assert run.fed.screen_cusum == 0.5 and st.screen.excluded == {3: 1}
    assert st.screen.cusum[3] > 0.5 and all(st.screen.cusum[p] < 0.5 for p in (0, 1, 2))
    run, st = run_two(tmp_path / "b", "fed.screen_cusum=null")
    assert st.screen.excluded == {} and st.rejections == []


def test_on_the_default_slice_run_a_reversed_change_from_the_middle_is_excluded_by_round_two(tmp_path):
    """The default config (``slice``, iid: ``fed.screen_cusum`` resolves to 1.5): a reversed change from client 2
    (budget 0.5) rises below ``fed.screen_nats`` in round 1 (about 1 nat) and was excluded only in round 2-6 by the
    per-round rule; its sum passes 1.5 in round 2, and that round undoes round 1. Off on a Dirichlet partition,
    where honest sums reached 4.9 nats."""
    from fedlowrank.runtime.inprocess import run_rounds

    run = fed_run(tmp_path / "a", "fed.rounds=2", 'fed.faults=["2:flip"]')
    st = make_strategy(run)
    initial = {k: v.clone() for k, v in st.global_state.items()}
    run_rounds(st, InProcessGrid(run), 2)
    assert run.fed.screen_cusum == 1.5 and st.screen.excluded == {2: 2}
    assert st.screen.cusum[2] > 1.5 and all(st.screen.cusum[p] < 1.5 for p in (0, 1, 3))
    assert _equal(st.global_state, initial)  # round 1 undone, round 2's replies set aside
    assert fed_run(tmp_path / "b", "fed.partition=dirichlet").fed.screen_cusum is None


def test_rounds_without_a_valid_update_checkpoint_until_the_failure_limit_stops_the_run(tmp_path):
    """Every client crashes: the global model is the same tensors round after round, so the rollback window holds
    them twice; each round checkpoint is still written (repeats copied, not refused by safetensors as shared
    memory), and the run stops at ``fed.max_failed_rounds`` with that cause, not a serialization error."""
    from safetensors.torch import load_file

    from fedlowrank.runtime.local import run_local

    run = fed_run(tmp_path, "fed.num_clients=2", "fed.rank_ratios=[0.5,1.0]", "fed.rounds=4", "fed.max_failed_rounds=3",
                  'fed.faults=["0:crash","1:crash"]')
    with pytest.raises(RuntimeError, match="3 rounds in a row"):
        run_local(run)
    saved = load_file(str(tmp_path / "checkpoints" / "round-000002" / "rollback.safetensors"))
    first = {k.split("/", 1)[1]: v for k, v in saved.items() if k.startswith("1/")}
    assert first and all(torch.equal(v, saved[f"2/{k}"]) for k, v in first.items())
