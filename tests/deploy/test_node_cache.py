"""The deployed node's disk cache (fedlowrank.deploy.cache): data and partitions, and the composed config."""
import numpy as np
import pytest
import torch

from fedlowrank.federated.task import FedData, fed_data
from helpers import text_run


def test_node_disk_cache_round_trips_and_ignores_damage(play, tmp_path, monkeypatch):
    """A second process (simulated: the in-memory cache cleared) reads the partitions from disk instead of
    recomputing them; a damaged entry is recomputed; a changed input file gets a new key."""
    from fedlowrank.deploy import cache
    from fedlowrank.federated import task

    monkeypatch.setenv("FEDLOWRANK_CACHE_DIR", str(tmp_path / "c"))
    task._cached.cache_clear()
    run = text_run(play, "fed.num_clients=3", "fed.rank_ratios=[0.25,0.5,1.0]")
    first = fed_data(run)
    entries = list((tmp_path / "c" / "fed-data").iterdir())
    assert len(entries) == 1
    task._cached.cache_clear()
    calls = []
    monkeypatch.setattr(task, "_load", lambda *a: calls.append(a))  # a cache hit must not recompute
    again = fed_data(run)
    assert calls == [] and torch.equal(again.x, first.x) and torch.equal(again.test.tensors[1], first.test.tensors[1])
    assert all(np.array_equal(a, b) for a, b in zip(again.train_parts, first.train_parts))
    assert all(np.array_equal(a, b) for a, b in zip(again.heldout_parts, first.heldout_parts))
    (entries[0] / "tensors.safetensors").write_bytes(b"garbage")
    assert cache.load(entries[0].name, FedData) is None  # damaged: not trusted, and deleted
    assert not entries[0].exists()
    task._cached.cache_clear()
    monkeypatch.undo()
    monkeypatch.setenv("FEDLOWRANK_CACHE_DIR", str(tmp_path / "c"))
    fed_data(run)  # recomputed, and the entry rebuilt
    rebuilt = cache.load(entries[0].name, FedData)
    assert rebuilt is not None and torch.equal(rebuilt.x, first.x)
    play.write_text(play.read_text() + "\\nROMEO:\\nOne more line for the key.\\n")
    assert cache.cache_key((1,), [str(play)]) != cache.cache_key((1,), [str(play) + "x"])
    task._cached.cache_clear()


def test_node_config_cache_matches_hydra_and_follows_the_config_files(tmp_path, monkeypatch):
    """The composed config a deployed node caches equals a fresh Hydra composition; a hit composes
    nothing; an edited config file, other overrides or a disabled cache compose again; bad overrides
    are never cached."""
    import shutil

    from omegaconf import OmegaConf

    from fedlowrank.config import federated_run_from_cfg
    from fedlowrank.deploy import cache
    from fedlowrank.federated import run_config as deploy

    conf = tmp_path / "conf"
    shutil.copytree(deploy.CONF_DIR, conf)
    monkeypatch.setenv("FEDLOWRANK_CACHE_DIR", str(tmp_path / "c"))
    calls = []

    def compose(ov):
        calls.append(list(ov))
        from hydra import compose as hc, initialize_config_dir

        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            return hc("config", overrides=list(ov))

    ov = ["mode=federated", "strategy=product", "fed.rounds=7", "fed.rank_ratios=[0.2,1.0]"]
    fresh = cache.composed_config(ov, conf, compose)
    hit = cache.composed_config(ov, conf, compose)
    assert len(calls) == 1 and OmegaConf.to_container(hit) == OmegaConf.to_container(fresh)
    assert OmegaConf.is_struct(hit)  # unknown keys still refused, as on a fresh composition
    hit.out_dir, fresh.out_dir = "x", "x"
    assert federated_run_from_cfg(hit) == federated_run_from_cfg(fresh)
    cache.composed_config(ov[:2], conf, compose)  # other overrides: another entry
    assert len(calls) == 2
    mode = conf / "mode" / "federated.yaml"
    mode.write_text(mode.read_text() + "fed:\n  rounds: 16\n")  # an edited config file
    assert cache.composed_config(ov[:2], conf, compose).fed.rounds == 16 and len(calls) == 3
    with pytest.raises(Exception):
        cache.composed_config(["mode=federated", "fed.no_such_key=1"], conf, compose)
    assert len(list((tmp_path / "c" / "configs").glob("*.yaml"))) == 3
    monkeypatch.setenv("FEDLOWRANK_CACHE_DIR", "off")
    cache.composed_config(ov, conf, compose)
    assert len(calls) == 5


def test_node_cache_evicts_least_recently_used_entries_beyond_its_limit(tmp_path, monkeypatch, play):
    """``FEDLOWRANK_CACHE_MAX_GB``: after a write the least recently used entries go until the cache fits; a hit
    makes an entry recent; the entry just written stays; an entry larger than the limit is not kept."""
    import os

    from fedlowrank.deploy import cache
    from fedlowrank.federated import task

    root = tmp_path / "c"
    monkeypatch.setenv("FEDLOWRANK_CACHE_DIR", str(root))
    (root / "fed-data").mkdir(parents=True)
    (root / "configs").mkdir()
    entries = []
    for i in range(4):  # 1000-byte entries, used at times 1..4
        e = root / "fed-data" / f"e{i}"
        e.mkdir()
        (e / "blob").write_bytes(b"x" * 1000)
        os.utime(e, ns=(10**9 * (i + 1),) * 2)
        entries.append(e)
    cfg = root / "configs" / "k.yaml"
    cfg.write_text("a: 1\n" * 100)  # 500 bytes, the newest
    assert cache.evict(root, limit=10**6) == []
    gone = cache.evict(root, keep=entries[0], limit=2600)  # e0 is kept although it is the oldest
    assert gone == [entries[1], entries[2]] and entries[0].exists() and entries[3].exists() and cfg.exists()
    assert sum(cache._size(p) for p in cache._entries(root)) <= 2600
    cache._touch(entries[0])
    assert cache.evict(root, limit=1600) == [entries[3]]  # e0 was used since: e3 is now the least recent
    monkeypatch.setenv("FEDLOWRANK_CACHE_MAX_GB", "0")  # nothing fits: a new entry is not kept
    task._cached.cache_clear()
    fed_data(text_run(play, "fed.num_clients=2", "fed.rank_ratios=[0.5,1.0]"))
    assert sorted(p.name for p in (root / "fed-data").iterdir()) == ["e0"]
    monkeypatch.setenv("FEDLOWRANK_CACHE_MAX_GB", "lots")
    assert cache.max_bytes() == int(cache.DEFAULT_MAX_GB * 2**30)
    task._cached.cache_clear()
