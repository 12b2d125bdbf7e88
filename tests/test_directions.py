"""The direction gate of fed.screen_cusum: changes in the space of the model's products, against numpy."""
import numpy as np
import torch

from fedlowrank.federated.directions import change, cosines


def test_changes_are_taken_in_product_space_whatever_the_rank():
    """A factorized layer's change is U'V' - UV (any rank), a dense tensor's its difference; BatchNorm statistics,
    integer buffers and tensors not sent are left out."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    sent = {"a.U": r(5, 2), "a.V": r(2, 3), "b.weight": r(4), "bn.running_mean": r(4), "bn.num_batches_tracked":
            torch.tensor(3)}
    upd = {"a.U": r(5, 2), "a.V": r(2, 3), "b.weight": r(4), "bn.running_mean": r(4), "bn.num_batches_tracked":
           torch.tensor(4), "fresh": r(2)}
    n = {k: v.double().numpy() for k, v in upd.items()}
    m = {k: v.double().numpy() for k, v in sent.items()}
    want = np.concatenate([(n["a.U"] @ n["a.V"] - m["a.U"] @ m["a.V"]).ravel(), n["b.weight"] - m["b.weight"]])
    np.testing.assert_allclose(change(upd, sent).numpy(), want, rtol=1e-12)
    hi = {"a.U": r(5, 3), "a.V": r(3, 3), "b.weight": r(4)}  # a larger budget: same product shape
    assert change(hi, {**hi, "a.U": hi["a.U"] * 0, "b.weight": hi["b.weight"] * 0}).shape == want.shape


def test_cosines_are_each_change_against_the_sum_of_the_others():
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=6) for _ in range(4)]
    got = cosines([torch.from_numpy(x) for x in xs])
    for i, x in enumerate(xs):
        o = sum(xs) - x
        assert abs(got[i] - x @ o / np.linalg.norm(x) / np.linalg.norm(o)) < 1e-12
    assert cosines([torch.ones(3), torch.ones(2)]) == [None, None]  # not comparable: no gate
    assert cosines([torch.zeros(3), torch.ones(3)]) == [0.0, 0.0]


def test_honest_clients_sharing_slots_are_not_excluded_in_the_default_run(tmp_path):
    """The default run at seed 15 (4 clients, iid, 15 rounds): in round 4 including honest client 2 raised the
    server sample's loss by 1.5 nats (its averaged slots with client 3 did worse than client 3's alone), which
    alone passed the cumulative bound and excluded it before the direction gate. Its change pointed along the
    others' (cosine -0.02), so nobody is excluded now."""
    from fedlowrank.runtime.inprocess import InProcessGrid, make_strategy, run_rounds
    from helpers import fed_run

    run = fed_run(tmp_path, "fed.num_clients=4", "seed=15", "fed.rounds=5")
    assert (run.strategy, run.fed.screen, run.fed.screen_cusum) == ("slice", "exclude", 1.5)  # the defaults
    st = make_strategy(run)
    run_rounds(st, InProcessGrid(run), run.fed.rounds)
    assert st.screen.excluded == {} and max(st.screen.cusum.values()) < 0.5
