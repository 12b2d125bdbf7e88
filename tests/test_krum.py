"""``fed.robust=krum``: Flower's Krum over whole models (``fedavg``, ``fedlmt``), checked against an independent
numpy Krum; refused where models differ in shape; a constant attacker's model is never the one chosen."""
import numpy as np
import pytest
import torch
from helpers import fed_run

from fedlowrank.config import ConfigError
from fedlowrank.federated.robust import krum
from fedlowrank.runtime.inprocess import InProcessGrid, make_strategy, run_rounds

pytestmark = pytest.mark.timeout(300)


def _numpy_krum(vectors: np.ndarray, f: int) -> int:
    """Blanchard et al. 2017: score_i = sum of the squared distances to its n - f - 2 nearest others; argmin."""
    n = len(vectors)
    d = ((vectors[:, None, :] - vectors[None, :, :]) ** 2).sum(-1)
    m = max(1, n - f - 2)
    scores = [np.sort(np.delete(d[i], i))[:m].sum() for i in range(n)]
    return int(np.argmin(scores))


@pytest.mark.parametrize("n, f", [(5, 1), (7, 2), (4, 1), (9, 1)])
def test_krum_picks_the_update_an_independent_numpy_krum_picks(n, f):
    """Random updates over two tensors (and an integer buffer carried along); the picked update is returned whole.
    Spread scales differ per update, so a wrong neighbour count or an argmax picks another update."""
    gen = torch.Generator().manual_seed(10 * n + f)
    picks = set()
    for trial in range(20):
        scale = torch.rand(n, generator=gen) * 3
        ups = [{"a.U": torch.randn(6, 3, generator=gen) * s, "b": torch.randn(4, generator=gen) * s + 1,
                "steps": torch.tensor(i)} for i, s in enumerate(scale)]
        flat = np.stack([torch.cat([u["a.U"].flatten(), u["b"]]).double().numpy() for u in ups])
        want = _numpy_krum(flat, f)
        got = krum(ups, f)
        assert int(got["steps"]) == want and torch.equal(got["a.U"], ups[want]["a.U"]), trial
        assert got["a.U"] is not ups[want]["a.U"]  # a copy: later in-place steps cannot touch a client's reply
        picks.add(want)
    assert len(picks) > 1  # the draws do exercise different choices


def test_krum_refuses_updates_of_different_shapes_and_configs_it_cannot_compare(tmp_path):
    with pytest.raises(ValueError, match="same keys and shapes"):
        krum([{"a": torch.zeros(2, 3)}, {"a": torch.zeros(2, 2)}, {"a": torch.zeros(2, 3)}], 1)
    with pytest.raises(ConfigError, match="krum"):
        fed_run(tmp_path, "strategy=slice", "fed.robust=krum")
    with pytest.raises(ConfigError, match="krum_f"):
        fed_run(tmp_path, "strategy=fedavg", "fed.robust=krum", "fed.krum_f=-1")


def test_krum_never_chooses_a_constant_attackers_model(tmp_path):
    """Dense FedAvg, 5 clients, client 4 sends every value just under its bound: the round's model is one honest
    client's reply, never the attacker's (and not their average: no entry near the attacker's value)."""
    run = fed_run(tmp_path, "strategy=fedavg", "fed.robust=krum", "fed.screen=none", "fed.clip_auto=null",
                  "fed.num_clients=5", "fed.local_steps=2", "fed.rounds=2", 'fed.faults=["4:constant"]')
    st = make_strategy(run)
    top = lambda: max(float(t.abs().max()) for t in st.global_state.values() if t.is_floating_point())  # noqa: E731
    start = top()  # about 0.12; averaging the attacker in instead gives about 150 after 2 rounds
    run_rounds(st, InProcessGrid(run), 2)
    assert top() < 2 * start, (start, top())
    assert [h["clients_ok"] for h in st.history] == [5, 5]
