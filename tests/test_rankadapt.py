"""Rank-adaptive federated training (method=inrank, federated): the server's explained-ratio rank from
the factors against a dense SVD, growth that keeps the function, optimal shrinking, and rank adaptation
that grows on a synthetic task that needs rank and shrinks on one that does not."""
import math

import numpy as np
import pytest
import torch

from fedlowrank.federated.aggregation import aggregate, budget_ranks, client_view
from fedlowrank.federated.rankadapt import adapt_ranks, due, explained, layer_caps
from fedlowrank.methods.inrank import InRankConfig
from fedlowrank.lowrank.spectrum import explained_variance_ratios

pytestmark = pytest.mark.timeout(120)


def _factors(m, n, spectrum, R, seed=0):
    """U (m, R), V (R, n) with U @ V having singular values ``spectrum`` (len ≤ R)."""
    g = torch.Generator().manual_seed(seed)
    P = torch.linalg.qr(torch.randn(m, R, generator=g, dtype=torch.float64)).Q
    Q = torch.linalg.qr(torch.randn(n, R, generator=g, dtype=torch.float64)).Q
    s = torch.zeros(R, dtype=torch.float64)
    s[: len(spectrum)] = torch.as_tensor(spectrum, dtype=torch.float64)
    return P * s.sqrt(), s.sqrt()[:, None] * Q.T


@pytest.mark.parametrize("rule", ["variance", "energy"])
def test_explained_rank_from_factors_matches_dense_numpy(rule):
    cfg = InRankConfig(rule=rule, threshold=0.9)
    U, V = _factors(40, 30, [9, 7, 5, 3, 2, 1, 0.5, 0.2], R=12)
    s = np.linalg.svd((U @ V).numpy(), compute_uv=False)  # dense, independent
    if rule == "energy":
        want = int(np.searchsorted(np.cumsum(s ** 2) / np.sum(s ** 2), 0.9 - 1e-12)) + 1
    else:  # 1 - var(s with k leading zeroed) / var(s), over all min(m, n) values
        ratios = [1 - np.var(np.concatenate([np.zeros(k), s[k:]]), ddof=1) / np.var(s, ddof=1)
                  for k in range(len(s) + 1)]
        want = next(k for k in range(1, len(s) + 1) if ratios[k] > 0.9)
        assert np.allclose(explained_variance_ratios(torch.as_tensor(s), 30).numpy(), ratios)
    assert explained(U, V, cfg) == want


def test_grow_keeps_the_function_and_shrink_is_the_best_approximation():
    cfg = InRankConfig(threshold=0.9, buffer=3, slack=0)
    flat = _factors(20, 16, [1.0] * 6, R=6)  # needs all its rank: grows to k + buffer, capped
    low = _factors(20, 16, [10.0, 8.0, 0.05, 0.04, 0.03, 0.02, 0.015, 0.01, 0.005, 0.001], R=10, seed=1)
    state = {"a.U": flat[0], "a.V": flat[1], "b.U": low[0], "b.V": low[1], "bias": torch.ones(3)}
    new, info = adapt_ranks(state, cfg, {"a": 8, "b": 16}, seed=0, rnd=1)
    ka, kb = info["a"][1], info["b"][1]
    assert ka >= 5 and info["a"] == (6, ka, 8)  # k + 3 > 6: grown, but to the cap 8
    assert new["a.U"].shape == (20, 8) and new["a.V"].shape == (8, 16)
    assert torch.allclose(new["a.U"] @ new["a.V"], state["a.U"] @ state["a.V"])  # growth changes nothing
    assert new["a.V"][6:].abs().sum() > 0  # new slots get gradients: V rows random, U columns zero
    assert kb == 2 and info["b"] == (10, 2, 5) and new["b.U"].shape == (20, 5)
    dense = (state["b.U"] @ state["b.V"]).numpy()
    P, S, Qh = np.linalg.svd(dense)
    best = (P[:, :5] * S[:5]) @ Qh[:5]  # Eckart–Young, independent of the library
    assert np.allclose((new["b.U"] @ new["b.V"]).numpy(), best, atol=1e-10)
    assert torch.equal(new["bias"], state["bias"]) and list(new) == list(state)
    again, _ = adapt_ranks(state, cfg, {"a": 8, "b": 16}, seed=0, rnd=1)
    assert all(torch.equal(again[k], new[k]) for k in new)  # seeded: a resumed run grows identically
    eager, _ = adapt_ranks(state, InRankConfig(buffer=3, slack=2), {"a": 8, "b": 16}, seed=0, rnd=1)
    assert eager["b.U"].shape[1] == 5  # 2 + 3 + 2 = 7 < 10: shrinks
    kept, _ = adapt_ranks(state, InRankConfig(buffer=3, slack=5), {"a": 8, "b": 16}, seed=0, rnd=1)
    assert kept["b.U"].shape[1] == 10  # 2 + 3 + 5 = 10 is not < 10: no shrink inside the slack


def _federated_regression(W: torch.Tensor, rounds: int, start: int, seed: int = 0) -> list[int]:
    """Four clients fit y = W x with a factorized linear map under the library's server code (slice
    views at budgets 0.5/1.0, slice aggregation, rank adaptation). Returns the global rank per round."""
    m, n = W.shape
    cfg = InRankConfig(threshold=0.9, init_rank=2, buffer=3, slack=1)
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(4):
        X = torch.randn(256, n, generator=g, dtype=torch.float64)
        data.append((X, X @ W.T + 0.01 * torch.randn(256, m, generator=g, dtype=torch.float64)))
    U0, V0 = _factors(m, n, [0.1] * start, R=start, seed=seed)  # small random start at rank ``start``
    state = {"lin.U": U0, "lin.V": V0}
    caps = layer_caps(state, cfg, {"ratio": 1.0})
    ranks = []
    for rnd in range(1, rounds + 1):
        updates, views = [], []
        for c, (X, Y) in enumerate(data):
            view = client_view(state, budget_ranks(state, ratio=(0.5, 1.0)[c % 2]), "slice")
            U = view["lin.U"].clone().requires_grad_()
            V = view["lin.V"].clone().requires_grad_()
            opt = torch.optim.SGD([U, V], lr=0.05)
            for _ in range(20):
                loss = ((X @ (U @ V).T - Y) ** 2).sum(1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            updates.append({"lin.U": U.detach(), "lin.V": V.detach()})
            views.append(view)
        state = aggregate(state, updates, [1.0] * 4, "slice", views)
        state, _ = adapt_ranks(state, cfg, caps, seed, rnd)
        ranks.append(state["lin.U"].shape[1])
    return ranks


def test_rank_grows_when_the_task_needs_rank_and_shrinks_when_it_does_not():
    g = torch.Generator().manual_seed(0)
    m = n = 24
    full = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64)).Q * 2  # flat spectrum: rank 24
    low = torch.randn(m, 2, generator=g, dtype=torch.float64) @ torch.randn(2, n, generator=g, dtype=torch.float64) / 3
    grow = _federated_regression(full, rounds=12, start=5)  # init_rank 2 + buffer 3
    assert grow[-1] >= 20 and grow == sorted(grow)  # grew from 5 towards the full 24, never shrank on the way
    shrink = _federated_regression(low, rounds=12, start=16)
    assert shrink[0] < 16 and shrink[-1] <= 2 + 3 + 1  # explained rank 2 + buffer 3, within the slack of 1
    stay = _federated_regression(low, rounds=6, start=5)
    assert max(stay) <= 6  # a task that needs rank 2 never grows far past its explained rank + buffer


def test_config_and_bad_input():
    InRankConfig().validate_federated()
    for bad in (dict(stage=2, stage1_ckpt="x"), dict(check_rounds=0), dict(threshold=1.5), dict(rule="x"),
                dict(slack=-1)):
        with pytest.raises(ValueError):
            InRankConfig(**bad).validate_federated()
    cfg = InRankConfig(warmup_rounds=2, check_rounds=3)
    assert [due(cfg, r) for r in range(1, 9)] == [False, False, False, False, True, False, False, True]


def test_federated_inrank_run_adapts_logs_and_caps_clients(tmp_path):
    """method=inrank in federated mode (in-process grid): starts at init_rank + buffer, the global ranks
    move, per-layer global ranks reach TensorBoard, and no client ever trains more than its budget or
    the global rank."""
    from fedlowrank.federated.tb import RunWriters

    from fedlowrank.config import ConfigError, federated_run_from_cfg
    from fedlowrank.federated.aggregation import layer_ranks
    from fedlowrank.runtime.inprocess import InProcessGrid, run_rounds
    from fedlowrank.federated.methods import fed_method
    from fedlowrank.federated.server import partition_sizes
    from helpers import compose_cfg
    from fedlowrank.federated.strategy import HeteroRankStrategy

    over = ["mode=federated", f"out_dir={tmp_path}", "fed.num_clients=3", "fed.local_epochs=1", "fed.rounds=3",
            "fed.rank_ratios=[0.1,0.5]", "method=inrank", "method.buffer=4", "strategy=product"]
    run = federated_run_from_cfg(compose_cfg(*over))
    method = fed_method(run)
    init = method.initial_state()
    start = layer_ranks(init)
    caps = layer_caps(init, method.cfg, {"ratio": 0.5})  # the largest budget caps the global rank
    assert start and start == {p: min(2 + 4, caps[p]) for p in caps}  # init_rank 2 + buffer 4
    writer = RunWriters(tmp_path / "tb")
    st = HeteroRankStrategy(run, method, init, writer=writer, sizes=partition_sizes(run))
    seen = []
    orig = method.view

    def spy(state, budget):
        v = orig(state, budget)
        seen.append((budget["ratio"], layer_ranks(state), layer_ranks(v)))
        return v

    method.view = spy
    run_rounds(st, InProcessGrid(run), 3)
    writer.close()
    assert [h["clients_ok"] for h in st.history] == [3, 3, 3]
    assert len({h["global_rank_sum"] for h in st.history} | {sum(start.values())}) > 1  # ranks moved
    full = {p: min(st.global_state[f"{p}.U"].shape[0], st.global_state[f"{p}.V"].shape[1]) for p in start}
    for ratio, g, v in seen:
        for p, r in v.items():
            assert r == min(g[p], math.ceil(ratio * full[p] - 1e-9))  # min(global rank, client budget)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    for p, r in layer_ranks(st.global_state).items():
        assert [e.value for e in acc.Scalars(f"global_rank/{p}")][-1] == r
    with pytest.raises(ConfigError, match="stage"):
        federated_run_from_cfg(compose_cfg(*over, "method.stage=2", "method.stage1_ckpt=x"))


def test_federated_inrank_resume_is_exact(tmp_path):
    """Stopped after round 2 (global model through safetensors, strategy state through JSON, as the round
    checkpoint does) and resumed: ranks and every tensor equal an uninterrupted 4-round run, bit for bit."""
    import json

    from safetensors.torch import load_file, save_file

    from fedlowrank.config import federated_run_from_cfg
    from fedlowrank.federated.aggregation import layer_ranks
    from fedlowrank.runtime.inprocess import InProcessGrid, make_strategy, run_rounds
    from fedlowrank.federated.methods import fed_method
    from fedlowrank.federated.server import partition_sizes
    from helpers import compose_cfg
    from fedlowrank.federated.strategy import HeteroRankStrategy

    run = federated_run_from_cfg(compose_cfg(
        "mode=federated", f"out_dir={tmp_path}", "fed.num_clients=4", "fed.local_steps=4", "fed.rounds=4",
        "fed.fraction_train=0.5", "fed.rank_ratios=[0.25,1.0]", "method=inrank", "method.buffer=4",
        "strategy=slice"))
    full = make_strategy(run)
    start = sum(layer_ranks(full.global_state).values())
    run_rounds(full, InProcessGrid(run), 4)
    part = make_strategy(run)
    run_rounds(part, InProcessGrid(run), 2)
    save_file(part.global_state, str(tmp_path / "g.safetensors"))
    (tmp_path / "s.json").write_text(json.dumps(part.state()))
    resumed = HeteroRankStrategy(run, fed_method(run), load_file(str(tmp_path / "g.safetensors")),
                                 sizes=partition_sizes(run), round_offset=2)
    resumed.restore(json.loads((tmp_path / "s.json").read_text()), part.history)
    run_rounds(resumed, InProcessGrid(run), 2)
    a, b = full.global_state, resumed.global_state
    # 2 of 4 clients a round: the restored sampling RNG (not a re-seeded one) picks the same clients
    sampled = [sorted(int(c["pid"]) for c in h["clients"]) for h in full.history]
    assert all(len(x) == 2 for x in sampled) and sampled[2:] != sampled[:2]  # a re-seeded RNG would repeat 1-2
    assert [sorted(int(c["pid"]) for c in h["clients"]) for h in resumed.history] == sampled
    assert len({start} | {h["global_rank_sum"] for h in full.history}) > 1  # ranks changed along the way
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
