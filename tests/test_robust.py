"""Hostile or broken clients: robust statistics against numpy, clipping, bounded weights, malformed
replies, and an attacking client in a (Ray-free) federated loop."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CONF
from helpers import fed_run as _run
from hydra import compose, initialize_config_dir

from fedlowrank.config import ConfigError, federated_run_from_cfg
from fedlowrank.runtime.inprocess import InProcessGrid, make_strategy, run_rounds
from fedlowrank.federated.methods import fed_method
from fedlowrank.federated.clipping import clip_update
from fedlowrank.federated.robust import RejectedReply, bounded_weight, check_metrics, robust_aggregate
from fedlowrank.federated.strategy import NoValidUpdates

pytestmark = pytest.mark.timeout(300)


def _np_trimmed(x: np.ndarray, trim: float) -> np.ndarray:
    n = x.shape[0]
    k = min(int(np.floor(trim * n)), (n - 1) // 2)
    return np.sort(x, axis=0)[k: n - k].mean(0)


@pytest.mark.parametrize("kind", ["median", "trimmed_mean"])
def test_robust_slice_is_slotwise_statistic_against_numpy(kind):
    g = {"fc.U": torch.randn(6, 4), "fc.V": torch.randn(4, 5), "fc.bias": torch.randn(6)}
    ranks = [1, 2, 4, 4, 4]
    ups = [{"fc.U": torch.randn(6, r), "fc.V": torch.randn(r, 5), "fc.bias": torch.randn(6)} for r in ranks]
    new = robust_aggregate(g, ups, "slice", kind, trim=0.2)
    stat = (lambda x: np.median(x, axis=0)) if kind == "median" else (lambda x: _np_trimmed(x, 0.2))
    for j in range(4):  # slot j: every client whose rank exceeds j
        who = [u for u, r in zip(ups, ranks) if r > j]
        np.testing.assert_allclose(new["fc.U"][:, j].numpy(), stat(np.stack([u["fc.U"][:, j].numpy() for u in who])),
                                   rtol=1e-6)
        np.testing.assert_allclose(new["fc.V"][j].numpy(), stat(np.stack([u["fc.V"][j].numpy() for u in who])),
                                   rtol=1e-6)
    np.testing.assert_allclose(new["fc.bias"].numpy(), stat(np.stack([u["fc.bias"].numpy() for u in ups])), rtol=1e-6)
    with pytest.raises(ValueError, match="fedlmt or slice"):
        robust_aggregate(g, ups, "product", kind)


def test_clip_scales_only_the_change_and_keeps_its_direction():
    view = {"a": torch.randn(5, 3), "b": torch.randn(4)}
    upd = {"a": view["a"] + 10 * torch.randn(5, 3), "b": view["b"] + 10 * torch.randn(4)}
    clipped, norm = clip_update(view, upd, 1.0)
    d0 = torch.cat([(upd[k] - view[k]).flatten() for k in "ab"]).double()
    d1 = torch.cat([(clipped[k] - view[k]).flatten() for k in "ab"]).double()
    assert norm == pytest.approx(float(d0.norm()), rel=1e-6)
    assert float(d1.norm()) == pytest.approx(1.0, rel=1e-4)
    assert float(torch.nn.functional.cosine_similarity(d0, d1, dim=0)) > 0.9999
    small = {"a": view["a"] + 1e-3, "b": view["b"]}
    assert clip_update(view, small, 1.0)[0] is small


def test_weights_are_bounded_and_bad_metrics_rejected():
    assert bounded_weight(1e30, 300, 1e6) == 300.0
    assert bounded_weight(1e30, None, 1e6) == 1e6
    assert bounded_weight(120.0, 300, 1e6) == 120.0
    ok = {"train_loss": 0.5, "num-examples": 10.0, "rank_sum": 4.0, "rank_ratio": 0.5}
    assert check_metrics(ok, 1e4)["train_loss"] == 0.5
    for bad, why in (({k: v for k, v in ok.items() if k != "train_loss"}, "lack"), ({**ok, "rank_sum": "x"}, "not a"),
                     ({**ok, "train_loss": float("nan")}, "finite"), ({**ok, "rank_ratio": 3.0}, "implausible")):
        with pytest.raises(RejectedReply, match=why):
            check_metrics(bad, 1e4)


_strategy = make_strategy


def _accuracy(run, state):
    from torch.utils.data import DataLoader

    from fedlowrank.data.vision import load_image_data
    from fedlowrank.federated.client import model_from_state
    from fedlowrank.training.loop import evaluate_classifier

    data = load_image_data(run.data.name, run.data.root, run.data.download, run.data.seed)
    return evaluate_classifier(model_from_state(run, state), DataLoader(data.test_set(), batch_size=256))["accuracy"]


def test_one_attacking_client_median_and_clipping_defend(tmp_path):
    """Client 0 sends a finite, 100x blown-up change every round (model replacement). Plain
    averaging is taken over; coordinate-wise median, norm clipping, automatic clipping and the default screen
    keep the model useful."""
    common = ("strategy=fedlmt", "fed.local_steps=30", "fed.lr=0.03", "fed.rank_ratios=[0.5]", "fed.max_failed_rounds=10")
    acc = {}
    off = ("fed.clip_auto=null", "fed.screen=none")  # no default defence: each rule on its own
    for name, extra in {"clean": (), "attack": ('fed.faults=["0:scale"]', *off),
                        "median": ('fed.faults=["0:scale"]', "fed.robust=median", *off),
                        "clip": ('fed.faults=["0:scale"]', "fed.clip_norm=2.0", *off),
                        "auto_clip": ('fed.faults=["0:scale"]', "fed.screen=none"),  # clipping where no screen runs
                        "default": ('fed.faults=["0:scale"]',)}.items():
        run = _run(tmp_path / name, *common, *extra)
        st = _strategy(run)
        run_rounds(st, InProcessGrid(run), 5)
        acc[name] = _accuracy(run, st.global_state)
    assert acc["clean"] > 0.75, acc
    assert acc["attack"] < acc["clean"] - 0.3, acc
    assert acc["median"] > acc["clean"] - 0.1, acc
    assert acc["clip"] > acc["clean"] - 0.1, acc
    assert acc["auto_clip"] > acc["clean"] - 0.02, acc  # fed.clip_auto=auto without a screen: 1.5
    assert acc["default"] > acc["clean"] - 0.02, acc  # the default screen excludes the attacker: within 2 pt


def test_inflated_example_count_changes_nothing_and_bad_replies_are_rejected(tmp_path):
    common = ("strategy=slice", "fed.rounds=2", "fed.local_steps=5")
    clean_run = _run(tmp_path / "c", *common)
    clean = _strategy(clean_run)
    run_rounds(clean, InProcessGrid(clean_run), 2)
    liar_run = _run(tmp_path / "l", *common, 'fed.faults=["0:weight"]')
    liar = _strategy(liar_run)
    run_rounds(liar, InProcessGrid(liar_run), 2)
    for k in clean.global_state:  # the claim of 1e9 examples is capped at the size the server knows
        assert torch.equal(clean.global_state[k], liar.global_state[k]), k
    bad_run = _run(tmp_path / "b", *common, 'fed.faults=["1:metrics","2:nan"]')
    st = _strategy(bad_run)
    run_rounds(st, InProcessGrid(bad_run), 2)
    assert [(r["clients_ok"], r["rejected"]) for r in st.history] == [(3, 2), (3, 2)]


def test_server_assigns_partitions_and_a_larger_budget_is_rejected(tmp_path):
    """Partition ids come from the server (one per node, every id once, sent with each message); a client that
    returns factors beyond the rank it was sent (a claimed larger budget) is rejected by shape."""
    run = _run(tmp_path, "fed.rounds=2", "fed.local_steps=2", 'fed.faults=["1:budget"]')
    st = _strategy(run)
    grid = InProcessGrid(run)
    grid.nodes = [7, 3, 5, 9, 1, 11]  # more nodes than partitions, in no order
    sent = []
    answer = grid._answer
    grid._answer = lambda m: sent.append((m.metadata.dst_node_id, m.content["config"]["partition-id"])) or answer(m)
    run_rounds(st, grid, 2)
    assert st.partition == {1: 0, 3: 1, 5: 2, 7: 3, 9: 4}  # sorted node ids get 0..n-1; node 11 gets nothing
    assert sorted(set(sent)) == sorted(st.partition.items())
    # rejected by shape and excluded (fed.screen=exclude): not asked to train in round 2
    assert [(r["clients_ok"], r["rejected"]) for r in st.history] == [(4, 1), (4, 0)]
    assert sorted(pid for node, pid in sent[5:]) == [0, 2, 3, 4]
    grid.nodes = [1, 5, 7, 9, 11, 12]  # node 3 left: its partition goes to the lowest new node
    st._assign(grid)
    assert st.partition == {1: 0, 5: 2, 7: 3, 9: 4, 11: 1}


def test_rounds_without_valid_update_stop_the_run(tmp_path):
    run = _run(tmp_path, "fed.rounds=5", "fed.local_steps=2", "fed.max_failed_rounds=2", "fed.num_clients=2",
               "fed.rank_ratios=[0.5,1.0]",
               'fed.faults=["0:crash","1:nan"]')
    st = _strategy(run)
    with pytest.raises(NoValidUpdates, match="2 rounds in a row"):
        run_rounds(st, InProcessGrid(run), 5)
    assert len(st.history) == 2
    text = (tmp_path / "client_failures.log").read_text()  # whole reasons on file, one line each in the log
    assert text.count("=== round") == 2 and "client 0" in text and "crashed (injected fault)" in text


@pytest.mark.parametrize("bad, key", [("fed.client_cpus=0", "client_cpus"), ("fed.lr=nan", "fed.lr"),
                                      ("fed.robust=mean", "fed.robust"), ('fed.faults=["9:nan"]', "fed.faults"),
                                      ("fed.checkpoint_every=0", "checkpoint_every"),
                                      ("fed.resume=yes", "fed.resume")])
def test_bad_federated_settings_rejected_before_work(tmp_path, bad, key):
    with pytest.raises(ConfigError, match=key):
        _run(tmp_path, bad)
    with pytest.raises(ConfigError, match="product"):
        _run(tmp_path, "strategy=product", "fed.robust=median")


def test_partitions_that_leave_clients_without_data_fail_before_ray(tmp_path):
    from fedlowrank.runtime.runner import check_partitions

    with pytest.raises(ConfigError, match="min_partition_size"):
        check_partitions(_run(tmp_path, "fed.min_partition_size=100000"))


def test_superlink_runtime_without_a_project_checkout_fails_before_any_work(tmp_path, monkeypatch):
    """An installed (not cloned) library has no pyproject.toml naming the apps: the default runtime refuses
    with a ConfigError before partitions are computed or any process starts."""
    from fedlowrank.runtime import runner, superlink

    started = []
    monkeypatch.setattr(runner, "check_partitions", lambda fr: started.append("partitions"))
    monkeypatch.setattr(superlink, "run_on_superlink", lambda fr, cfg: started.append("superlink") or {})
    cfg = compose_cfg_for(tmp_path, "fed.isolation=none")  # the stand-in above runs in this process
    monkeypatch.setattr(superlink, "PROJECT", tmp_path / "site-packages")
    with pytest.raises(ConfigError, match="pyproject.toml"):
        runner.run(cfg)
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "site-packages" / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    with pytest.raises(ConfigError, match="tool.flwr.app"):
        runner.run(cfg)
    monkeypatch.setattr(superlink, "PROJECT", Path(runner.__file__).resolve().parents[2])
    monkeypatch.setattr(superlink, "BIN", tmp_path / "bin")
    with pytest.raises(ConfigError, match="flwr, flower-superlink"):
        runner.run(cfg)
    assert started == []
    monkeypatch.setattr(superlink, "BIN", Path(sys.executable).parent)
    runner.run(cfg)  # the real checkout passes the check
    assert started == ["partitions", "superlink"]


def test_private_network_is_required_used_or_warned_about(tmp_path, monkeypatch, caplog):
    """``fed.isolation``: netns refuses (exit 2, before any work) where the kernel has no private network,
    auto warns there and runs on the shared loopback, none never probes."""
    from fedlowrank.runtime import private_net, runner

    probes = []
    monkeypatch.setattr(private_net, "unavailable", lambda: probes.append(1) or "unshare: EPERM")
    fr = lambda *o: federated_run_from_cfg(compose_cfg_for(tmp_path, *o))  # noqa: E731
    with pytest.raises(ConfigError, match="fed.isolation=netns.*EPERM"):
        runner.use_private_network(fr("fed.isolation=netns"))
    with caplog.at_level("WARNING", logger="fedlowrank"):
        assert runner.use_private_network(fr()) is False
    assert "accept any local process" in caplog.text and "EPERM" in caplog.text
    assert runner.use_private_network(fr("fed.isolation=none")) is False and len(probes) == 2
    monkeypatch.setattr(private_net, "unavailable", lambda: None)
    assert runner.use_private_network(fr()) is True and runner.use_private_network(fr("fed.isolation=netns"))


def compose_cfg_for(tmp_path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=["mode=federated", f"out_dir={tmp_path / 'out'}", *overrides])


def test_remote_run_config_cannot_choose_file_paths():
    from fedlowrank.federated.run_config import run_from_run_config

    for o in ("out_dir=/tmp/x", "data.root=/etc", "method.from_ckpt=/x.safetensors", "hydra.run.dir=/x",
              "+data.root=/x"):
        with pytest.raises(ConfigError, match="file path"):
            run_from_run_config({"overrides": o})
    for d in ("/abs", "../up", "a/../../b"):
        with pytest.raises(ConfigError, match="relative"):
            run_from_run_config({"out-dir": d})
    fr = run_from_run_config({"overrides": "strategy=product fed.rounds=2", "out-dir": "outputs/x"})
    assert fr.strategy == "product" and fr.fed.rounds == 2 and fr.out_dir == "outputs/x"


def test_config_file_in_a_run_config_only_on_a_runtime_main_started(tmp_path, monkeypatch):
    """A submitted run config may name a resolved config file (any paths in it) only where main.py started
    the runtime itself and marked it trusted; elsewhere it is refused."""
    from omegaconf import OmegaConf

    from fedlowrank.federated.run_config import TRUST_ENV, run_from_run_config
    from helpers import compose_cfg

    conf = tmp_path / "config.yaml"
    OmegaConf.save(compose_cfg("mode=federated", "strategy=product", f"out_dir={tmp_path / 'abs'}"), conf)
    monkeypatch.delenv(TRUST_ENV, raising=False)
    with pytest.raises(ConfigError, match="config-file"):
        run_from_run_config({"config-file": str(conf)})
    monkeypatch.setenv(TRUST_ENV, "1")
    fr = run_from_run_config({"config-file": str(conf)})
    assert fr.strategy == "product" and fr.out_dir == str(tmp_path / "abs")


def test_product_keeps_energy_beyond_the_smallest_budget_and_is_bit_reproducible(tmp_path):
    """Mixed budgets 0.1 / 1.0 under ``product`` for 10 rounds: aggregating changes keeps the
    directions the 0.1 clients never see (the plain product average collapses them to ~0), the two
    budgets score differently, and a second run gives bit-identical factors."""
    from fedlowrank.federated.aggregation import budget_ranks, factor_prefixes
    from fedlowrank.lowrank.spectrum import factored_svd

    def go(name, plain=False):
        run = _run(tmp_path / name, "strategy=product", "fed.num_clients=4", "fed.rank_ratios=[0.1,1.0]",
                   "fed.local_steps=10")
        st = _strategy(run)
        if plain:
            agg = st.method.aggregate
            st.method.aggregate = lambda g, u, w, views=None: agg(g, u, w, None)
        run_rounds(st, InProcessGrid(run), 10)
        return run, st.global_state

    def tail_energy(g):
        p = factor_prefixes(g)[0]
        S = factored_svd(g[f"{p}.U"], g[f"{p}.V"])[1].double().square()
        r = budget_ranks(g, ratio=0.1)[p]
        return float(S[r:].sum() / S.sum())

    run, g = go("a")
    _, g2 = go("b")
    _, plain = go("plain", plain=True)
    assert all(torch.equal(g[k], g2[k]) for k in g)
    assert tail_energy(g) > 0.1 and tail_energy(plain) < 1e-3
    m = fed_method(run)
    accs = [_accuracy(run, m.view(g, {"ratio": b})) for b in (0.1, 1.0)]
    assert accs[0] != accs[1] and min(accs) > 0.8, accs


def test_superlink_runtime_gets_file_paths_resolved_where_main_py_ran(tmp_path):
    """The apps run in the SuperLink's working directory (<out_dir>/flwr_runtime), so the config main.py hands
    over carries absolute paths, resolved against main.py's working directory as run_simulation would."""
    import os

    from omegaconf import OmegaConf

    from fedlowrank.runtime.superlink import with_absolute_paths

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=fed_shakespeare", f"out_dir={tmp_path / 'out'}",
                                           "data.path=../shared/data/tinyshakespeare.txt", "method=welore",
                                           "method.from_ckpt=ckpts/start.safetensors"])
    out = with_absolute_paths(cfg, tmp_path / "here")
    assert out.data.path == os.path.normpath(str(tmp_path / "shared/data/tinyshakespeare.txt"))
    assert out.method.from_ckpt == str(tmp_path / "here/ckpts/start.safetensors")
    assert out.out_dir == str(tmp_path / "out")  # already absolute: unchanged
    assert cfg.data.path == "../shared/data/tinyshakespeare.txt"  # the caller's config is not modified
    assert OmegaConf.to_container(out.fed) == OmegaConf.to_container(cfg.fed)
