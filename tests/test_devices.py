"""Device-heterogeneity cost model against hand computations: the time model, deadline dropping on a
hand-made population, seeded populations with the configured spread, budgets from memory/compute."""
import math

import pytest

from fedlowrank.federated.devices import (DeviceProfile, DevicesConfig, budget_ratio, client_time, population,
                                          round_clock)


def test_time_model_by_hand():
    dev = DeviceProfile(flops=2e9, up_bps=1e5, down_bps=4e5, memory=1e8)
    # 800 kB down at 400 kB/s = 2 s; 6 GFLOP at 2 GFLOP/s = 3 s; 50 kB up at 100 kB/s = 0.5 s
    assert client_time(dev, train_flops=6e9, down_bytes=8e5, up_bytes=5e4) == pytest.approx(5.5)


def test_deadline_drops_exactly_the_stragglers():
    devs = [DeviceProfile(1e9, 1e6, 1e6, 1e8), DeviceProfile(1e8, 1e6, 1e6, 1e8), DeviceProfile(5e8, 1e6, 1e6, 1e8)]
    times = {pid: client_time(d, 1e9, 1e6, 1e6) for pid, d in enumerate(devs)}  # 1+1+1=3 s, 10+2=12 s, 2+2=4 s
    assert times == pytest.approx({0: 3.0, 1: 12.0, 2: 4.0})
    assert round_clock(times, None) == (pytest.approx(12.0), [0, 1, 2], [])
    assert round_clock(times, 5.0) == (5.0, [0, 2], [1])  # the round waits for the deadline, not the straggler
    assert round_clock(times, 20.0) == (pytest.approx(12.0), [0, 1, 2], [])
    assert round_clock({0: 6.0}, 5.0) == (5.0, [], [0])


@pytest.mark.parametrize("dist", ["uniform", "lognormal"])
def test_population_is_seeded_and_has_the_spread(dist):
    cfg = DevicesConfig(distribution=dist, spread=10.0, seed=3)
    a, b = population(cfg, 400), population(cfg, 400)
    assert a == b and population(DevicesConfig(distribution=dist, seed=4), 400) != a
    f = sorted(d.flops / cfg.flops for d in a)
    if dist == "uniform":
        assert 1 / math.sqrt(10) <= f[0] and f[-1] <= math.sqrt(10) and f[-1] / f[0] > 8
    else:  # 5 % / 95 % quantiles near 10^(∓1/2)
        assert f[20] == pytest.approx(10 ** -0.5, rel=0.25) and f[380] == pytest.approx(10 ** 0.5, rel=0.25)
    assert all(d.memory / cfg.memory == pytest.approx(d.flops / cfg.flops) for d in a)  # one factor per device


def test_tiers_list_and_budgets():
    cfg = DevicesConfig(distribution="tiers", tiers=[0.1, 0.3, 1.0], budget_from="memory")
    pop = population(cfg, 5)
    assert [d.flops / cfg.flops for d in pop] == pytest.approx([0.1, 0.3, 1.0, 0.1, 0.3])
    levels = [0.1, 0.25, 0.5, 1.0]
    assert [budget_ratio(d, cfg, levels) for d in pop] == [0.1, 0.25, 1.0, 0.1, 0.25]
    tiny = DeviceProfile(1.0, 1.0, 1.0, 1.0)
    assert budget_ratio(tiny, cfg, levels) == 0.1  # nothing fits: the smallest budget
    listed = DevicesConfig(distribution="list", devices=[{"flops": 1, "up_bps": 2, "down_bps": 3, "memory": 4}])
    assert population(listed, 1) == [DeviceProfile(1.0, 2.0, 3.0, 4.0)]
    with pytest.raises(ValueError, match="lists 1 devices for 2"):
        population(listed, 2)
    assert population(DevicesConfig(), 3) is None


@pytest.mark.parametrize("bad", [dict(distribution="zipf"), dict(spread=0.5), dict(deadline_s=0),
                                 dict(budget_from="disk"), dict(devices=[{"flops": 1}]), dict(flops=-1)])
def test_bad_device_config_is_rejected(bad):
    with pytest.raises(ValueError):
        DevicesConfig(**bad).validate()


def _fed_run(*overrides):
    from fedlowrank.config import federated_run_from_cfg
    from helpers import compose_cfg

    return federated_run_from_cfg(compose_cfg("mode=federated", "out_dir=/tmp/x", "fed.num_clients=4",
                                              "fed.local_epochs=1", "fed.rank_ratios=[0.1,1.0]", *overrides))


def test_strategy_simulated_time_budgets_from_memory_and_deadline():
    """Budgets come from the devices (tiers 0.1 / 1.0 of the median memory); each client's simulated time
    matches the time model with server-known examples and counted FLOPs; a deadline between the clients'
    times drops exactly the slower ones and the round then lasts the deadline."""
    from fedlowrank.runtime.inprocess import InProcessGrid, make_strategy, run_rounds
    from fedlowrank.lowrank import state_bytes

    dev = ["fed.devices.distribution=tiers", "fed.devices.tiers=[0.1,1.0]", "fed.devices.budget_from=memory",
           "fed.devices.up_bps=1e12", "fed.devices.down_bps=1e12"]
    run = _fed_run(*dev)
    assert [run.fed.budget(i)["ratio"] for i in range(4)] == [0.1, 1.0, 0.1, 1.0]
    st = make_strategy(run)
    start = {k: v.clone() for k, v in st.global_state.items()}  # what round 1 cuts the clients' views from
    run_rounds(st, InProcessGrid(run), 1)
    h = st.history[-1]
    pop = run.fed.device_population()
    for c in h["clients"]:
        pid = c["pid"]
        view = st.method.view(start, run.fed.budget(pid))
        flops = st.clock.per_example_flops(view) * st.sizes[pid]  # 1 epoch over its partition
        d = pop[pid]  # the tier factor scales compute, bandwidth and memory alike
        expect = state_bytes(view) / d.down_bps + flops / d.flops + state_bytes(view) / d.up_bps
        assert c["sim_time_s"] == pytest.approx(expect, rel=1e-6)
    times = {c["pid"]: c["sim_time_s"] for c in h["clients"]}
    assert h["sim_round_s"] == pytest.approx(max(times.values())) and h["stragglers"] == 0
    assert times[0] > times[1]  # a tenth of the compute outweighs a tenth of the rank here
    cut = (min(times[0], times[2]) + max(times[1], times[3])) / 2
    run2 = _fed_run(*dev, f"fed.devices.deadline_s={cut}")
    st2 = make_strategy(run2)
    run_rounds(st2, InProcessGrid(run2), 2)
    for h2 in st2.history:
        assert h2["stragglers"] == 2 and h2["clients_ok"] == 2 and h2["sim_round_s"] == pytest.approx(cut)
        assert sorted(c["pid"] for c in h2["clients"]) == [1, 3]
    assert st2.clock.elapsed == pytest.approx(2 * cut) == st2.history[-1]["sim_time_s"]
