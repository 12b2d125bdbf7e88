"""Server optimizers (``fed.server_opt``) on the aggregated change: on a dense model each equals Flower 1.41's own
strategy (FedAdam, FedYogi, FedAdagrad, FedAvgM) fed the same replies, round after round; with ``product`` they act
in the space of the products U V; their moments survive a resume."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from flwr.serverapp import strategy as fl
from helpers import fed_run as _run

from fedlowrank.runtime.inprocess import InProcessGrid, make_strategy


@pytest.mark.parametrize("kind,flower", [("adam", lambda: fl.FedAdam()), ("yogi", lambda: fl.FedYogi()),
                                         ("adagrad", lambda: fl.FedAdagrad()),
                                         ("avgm", lambda: fl.FedAvgM(server_momentum=0.9))])
def test_server_optimizers_equal_flowers_strategies_on_a_dense_model(tmp_path, kind, flower):
    run = _run(tmp_path, "strategy=fedavg", f"fed.server_opt={kind}", "fed.clip_auto=null", "fed.local_steps=3",
               "fed.num_clients=3")
    st, grid, ref = make_strategy(run), InProcessGrid(run), flower()
    plain = make_strategy(_run(tmp_path / "plain", "strategy=fedavg", "fed.clip_auto=null", "fed.local_steps=3",
                               "fed.num_clients=3"))
    for rnd in (1, 2, 3):
        before = {k: v.numpy().copy() for k, v in st.global_state.items()}
        replies = grid.send_and_receive(list(st.configure_train(rnd, None, None, grid)))
        own = copy.deepcopy(replies)  # aggregate_train releases the arrays of the replies it accepts
        ref.current_arrays = ArrayRecord({k: Array(v) for k, v in before.items()}) if kind == "avgm" else before
        out, _ = ref.aggregate_train(rnd, replies)
        st.aggregate_train(rnd, replies)
        want = dict(zip(out.keys(), out.to_numpy_ndarrays()))
        for k, v in st.global_state.items():
            np.testing.assert_allclose(v.numpy(), want[k], rtol=1e-5, atol=1e-6, err_msg=f"round {rnd}, {k}")
        plain.global_state = {k: torch.from_numpy(v) for k, v in before.items()}
        plain.sent, plain.expected, plain.partition, plain.budgets = st.sent, st.expected, st.partition, st.budgets
        plain.aggregate_train(rnd, own)  # a control: without the optimizer the model differs (FedAvgM's
        if kind != "avgm" or rnd > 1:      # first step, at server lr 1, is plain FedAvg)
            assert any(not torch.allclose(plain.global_state[k], st.global_state[k]) for k in st.global_state)


def test_product_steps_in_the_space_of_products_and_resumes_its_moments(tmp_path):
    from fedlowrank.federated.server_opt import ServerOptConfig, ServerOptimizer

    torch.manual_seed(0)
    cur = {"l.U": torch.randn(6, 2), "l.V": torch.randn(2, 5), "b": torch.randn(6)}
    agg = {"l.U": torch.randn(6, 2), "l.V": torch.randn(2, 5), "b": torch.randn(6)}
    opt = ServerOptimizer(ServerOptConfig("adagrad", lr=0.1), product_space=True)
    new = opt.step(1, cur, agg)
    W, W2 = cur["l.U"] @ cur["l.V"], agg["l.U"] @ agg["l.V"]
    d = (W2 - W).double()
    step = W.double() + 0.1 * d / (d.abs() + 1e-3)  # adagrad's first step: m = d, v = d^2
    U, S, Vh = torch.linalg.svd(step)
    best = (U[:, :2] * S[:2]) @ Vh[:2]  # the best rank-2 approximation of the stepped product
    torch.testing.assert_close((new["l.U"] @ new["l.V"]).double(), best, rtol=1e-5, atol=1e-5)
    assert new["l.U"].shape == (6, 2) and set(new) == set(cur)
    again = ServerOptimizer(ServerOptConfig("adagrad", lr=0.1), product_space=True)
    again.load(opt.state())  # what a round checkpoint stores
    a, b = opt.step(2, new, agg), again.step(2, new, agg)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_round_checkpoint_carries_the_moments(tmp_path):
    from fedlowrank.federated.resume import resume_point
    from fedlowrank.federated.server import _save_round

    run = _run(tmp_path, "strategy=fedavg", "fed.server_opt=adam", "fed.resume=auto")
    st = make_strategy(run)
    w, t = next(iter(st.global_state.items()))
    moments = {f"m/{w}": torch.randn(t.shape, dtype=torch.float64), f"v/{w}": torch.rand(t.shape, dtype=torch.float64)}
    _save_round(tmp_path, run, 1, st.global_state, st.state(), moments)
    rnd, _, saved, _, _ = resume_point(tmp_path, run, st.global_state)
    st.restore(saved, [])
    assert rnd == 1 and st.server_opt.m[w].equal(moments[f"m/{w}"]) and st.server_opt.v[w].equal(moments[f"v/{w}"])
