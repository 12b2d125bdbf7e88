"""Clients get nothing they were not given: the budget comes from the server's config (a node claiming another
is ignored), metrics are whitelisted, a reply may not set server-reserved keys or claim another partition."""
from __future__ import annotations

import pytest
from flwr.app import ConfigRecord

from fedlowrank.config import federated_run_from_cfg
from fedlowrank.federated.robust import MAX_METRIC_KEYS, RejectedReply, check_metrics
from fedlowrank.runtime.inprocess import make_strategy

from helpers import compose_cfg

GOOD = {"train_loss": 1.0, "num-examples": 10.0, "rank_sum": 8.0, "rank_ratio": 0.25, "partition_id": 2.0,
        "steps": 3.0}


def test_metrics_are_whitelisted_and_reserved_keys_rejected():
    out = check_metrics({**GOOD, "extra_junk": 5.0}, 1e6, partition_id=2)
    assert "extra_junk" not in out and out["train_loss"] == 1.0
    for bad in ({"pid": 0.0}, {"weight": 1e9}, {"update_norm": 0.0}):
        with pytest.raises(RejectedReply, match="reserved"):
            check_metrics({**GOOD, **bad}, 1e6, partition_id=2)
    with pytest.raises(RejectedReply, match="claim partition 3"):
        check_metrics({**GOOD, "partition_id": 3.0}, 1e6, partition_id=2)
    with pytest.raises(RejectedReply, match="metric keys"):
        check_metrics({**GOOD, **{f"k{i}": 0.0 for i in range(MAX_METRIC_KEYS)}}, 1e6, partition_id=2)


def test_a_node_claiming_a_larger_budget_is_ignored(tmp_path):
    run = federated_run_from_cfg(compose_cfg("fed.num_clients=4", "fed.rank_ratios=[0.1,0.25,0.5,1.0]",
                                             f"out_dir={tmp_path}"))
    st = make_strategy(run)
    assert st._check_budget(ConfigRecord({"partition_id": 0, "ratio": 0.1})) == (0, {"ratio": 0.1})
    with pytest.raises(ValueError, match="claims budget .*1.0.* gives partition 1"):
        st._check_budget(ConfigRecord({"partition_id": 1, "ratio": 1.0}))
    with pytest.raises(ValueError, match="claims budget"):
        st._check_budget(ConfigRecord({"partition_id": 1, "rank": 64}))
