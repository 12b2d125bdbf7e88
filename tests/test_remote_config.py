"""A remote run config (``flwr run --run-config``) cannot name files, read the node's environment or load YAML
from outside ``conf/``, whatever the syntax, and a node's config cache cannot smuggle any of it in: each bypass
a review found is refused, and ordinary overrides still work."""
from __future__ import annotations

import os

import pytest
import yaml

from fedlowrank.config import ConfigError
from fedlowrank.federated.run_config import compose_cfg, run_from_run_config


@pytest.mark.parametrize("override", ["++data={path:/etc/passwd}", "++data={root:/srv}", "++method={from_ckpt:/x}",
                                      "+data.cache_dir=/tmp/x", "++model={pretrained:/x}", "schema@fed=fed"])
def test_path_setting_syntaxes_are_refused(override):
    with pytest.raises(ConfigError):
        run_from_run_config({"overrides": override})


def test_group_options_must_exist_under_conf(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("name: digits\nroot: /etc\n")
    rel = os.path.relpath(evil.with_suffix(""), os.path.join(os.path.dirname(__file__), "..", "conf", "data"))
    with pytest.raises(ConfigError, match="data must name one of its options"):
        run_from_run_config({"overrides": f"data={rel}"})


def test_interpolations_are_refused_without_echoing_their_value(monkeypatch):
    monkeypatch.setenv("FEDLOWRANK_SECRET", "s3cr3t-value")
    for o in ("data.name=${oc.env:FEDLOWRANK_SECRET}", "fed.rounds='${oc.env:FEDLOWRANK_SECRET}'"):
        with pytest.raises(ConfigError) as e:
            run_from_run_config({"overrides": o})
        assert "s3cr3t" not in str(e.value) and "interpolation" in str(e.value)


def test_a_composed_config_with_other_paths_is_refused_whatever_produced_it():
    def poisoned(overrides):  # stands for a node cache entry, or any syntax that slipped past the string check
        cfg = compose_cfg(overrides)
        cfg.data.root = "/etc"
        return cfg

    with pytest.raises(ConfigError, match=r"changes path-valued or interpolated key\(s\) \['data.root'\]"):
        run_from_run_config({"overrides": "fed.rounds=2"}, poisoned)


def test_a_poisoned_node_cache_entry_is_refused(tmp_path, monkeypatch):
    from fedlowrank.deploy.cache import cached_compose

    monkeypatch.setenv("FEDLOWRANK_CACHE_DIR", str(tmp_path))
    run_from_run_config({"overrides": "fed.rounds=2"}, cached_compose)  # fills the cache
    (entry,) = (tmp_path / "configs").glob("*.yaml")
    cfg = yaml.safe_load(entry.read_text())
    cfg["data"]["root"] = "${oc.env:HOME}"
    entry.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="data.root"):
        run_from_run_config({"overrides": "fed.rounds=2"}, cached_compose)


@pytest.mark.parametrize("overrides", ["strategy=product fed.rounds=2", "experiment=fed_digits_dirichlet",
                                       "method=none fed.num_clients=3 fed.rank_ratios=[0.5,1.0]", "data=digits fed.partition=iid"])
def test_ordinary_overrides_still_compose(overrides):
    run = run_from_run_config({"overrides": overrides, "out-dir": "outputs/x"})
    assert run.out_dir == "outputs/x"
