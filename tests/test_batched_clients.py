"""fed.batched_clients: clients of one budget trained as one vectorized computation give the sequential loop's
replies to float rounding, for every aggregation rule, and what cannot be batched is refused before any work."""
import pytest
import torch

from fedlowrank.config import ConfigError
from fedlowrank.federated.batched import _orders, train_group
from fedlowrank.federated.client import local_train
from fedlowrank.runtime.inprocess import InProcessGrid, make_strategy
from fedlowrank.training.batches import TensorBatches
from helpers import fed_run


def _jobs(run, strategy, rnd: int):
    """The strategy's messages of round ``rnd`` and, per message, (partition id, the state it carries, round)."""
    msgs = list(strategy.configure_train(rnd, None, None, InProcessGrid(run)))
    return msgs, [(int(m.content["config"]["partition-id"]), m.content["arrays"].to_torch_state_dict(), rnd)
                  for m in msgs]


def _replies(msgs, results):
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    return [Message(RecordDict({"arrays": ArrayRecord.from_torch_state_dict(st), "metrics": MetricRecord(met)}),
                    reply_to=m) for m, (st, met) in zip(msgs, results)]


@pytest.mark.parametrize("strategy,nested", [("slice", False), ("product", False), ("fedlmt", False),
                                             ("fedavg", False), ("slice", True), ("product", True)])
def test_batched_replies_equal_the_sequential_ones_and_so_does_the_aggregate(tmp_path, strategy, nested):
    """Clients of different budgets train in one padded group (and, nested, each on its own sub-model draws)."""
    run = fed_run(tmp_path, f"strategy={strategy}", "fed.num_clients=6", "fed.rank_ratios=[0.25,0.5,1.0]",
                  "fed.partition=dirichlet", "fed.alpha=0.3", "fed.local_epochs=2", "fed.weight_decay=1e-3",
                  "fed.batched_clients=true", "fed.runtime=local", "fed.clip_auto=1.5", f"fed.nested={nested}")
    seq_strategy, bat_strategy = make_strategy(run), make_strategy(run)
    msgs, jobs = _jobs(run, seq_strategy, 1)
    seq = [local_train(run, pid, run.fed.num_clients, st, rnd) for pid, st, rnd in jobs]
    bat = train_group(run, jobs, run.fed.num_clients)  # the whole round at once
    assert len({tuple(run.fed.budget(p).items()) for p, _, _ in jobs}) == 3
    shapes = {tuple((k, tuple(v.shape)) for k, v in sorted(st.items())) for _, st, _ in jobs}
    assert len(shapes) == (1 if strategy in ("fedavg", "fedlmt") else 3)  # three ranks trained in one padded group
    sizes = sorted(m["num-examples"] for _, m in seq)
    assert sizes[0] < sizes[-1]  # unequal clients: different step counts and short last batches are exercised
    for (s_state, s_met), (b_state, b_met) in zip(seq, bat):
        assert s_state.keys() == b_state.keys()
        for k in s_state:
            torch.testing.assert_close(b_state[k], s_state[k], rtol=1e-5, atol=1e-5)
        assert b_met["steps"] == s_met["steps"] and b_met["num-examples"] == s_met["num-examples"]
        assert b_met["train_loss"] == pytest.approx(s_met["train_loss"], rel=1e-5)
        assert b_met["train_accuracy"] == pytest.approx(s_met["train_accuracy"], abs=1e-9)
    # the server sees the same round either way (clipping included)
    msgs2, jobs2 = _jobs(run, bat_strategy, 1)
    assert [j[0] for j in jobs2] == [j[0] for j in jobs]
    seq_strategy.aggregate_train(1, _replies(msgs, seq))
    bat_strategy.aggregate_train(1, _replies(msgs2, bat))
    assert seq_strategy.history[-1]["clients_ok"] == len(jobs)  # every reply accepted
    for k, v in seq_strategy.global_state.items():
        torch.testing.assert_close(bat_strategy.global_state[k], v, rtol=1e-5, atol=1e-5)


def test_data_orders_are_the_sequential_clients_batches(tmp_path):
    """_orders draws what TensorBatches draws for the epochs a client starts, local_steps cutting an epoch short."""
    run = fed_run(tmp_path, "fed.local_epochs=3", "fed.local_steps=5", "fed.batch_size=4")
    ds = torch.utils.data.TensorDataset(torch.arange(14).float()[:, None], torch.arange(14))
    torch.manual_seed(3)
    ref = [b[1] for _ in range(2) for b in TensorBatches(ds, 4, shuffle=True)][:5]  # 4 per epoch: 2 epochs start
    after_ref = torch.randn(2)
    torch.manual_seed(3)
    got = _orders(ds, run.fed)
    assert [o.tolist() for o in got] == [r.tolist() for r in ref] and torch.equal(torch.randn(2), after_ref)


@pytest.mark.parametrize("extra,why", [
    (["fed.prox_mu=0.01"], "fed.prox_mu"),
    (["experiment=fed_relora"], "method=relora"), (["+model.dropout=0.2"], "Dropout"),
    (["fed.runtime=simulation"], "needs fed.runtime=local")])
def test_what_cannot_be_batched_is_refused_before_any_work(tmp_path, extra, why):
    from fedlowrank.runtime.runner import check_batched

    runtime = [] if any(e.startswith("fed.runtime") for e in extra) else ["fed.runtime=local"]
    run = fed_run(tmp_path, "fed.batched_clients=true", *runtime, *extra)
    with pytest.raises(ConfigError, match=why):
        check_batched(run)
