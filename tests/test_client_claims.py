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


def test_clip_to_median_bounds_each_change_rms_against_numpy():
    import numpy as np
    import torch

    from fedlowrank.federated.robust import clip_to_median

    torch.manual_seed(0)
    views = [{"w": torch.randn(4, 3), "b": torch.randn(4)} for _ in range(4)]
    scales = [1.0, 1.1, 0.9, 50.0]  # the last one is blown up
    ups = [{k: v + s * torch.randn_like(v) for k, v in view.items()} for view, s in zip(views, scales)]
    out, clipped = clip_to_median(list(zip(views, ups)), 1.5)
    rms = [np.sqrt(np.mean(np.concatenate([(u[k] - v[k]).numpy().ravel() for k in v]) ** 2)) for v, u in zip(views, ups)]
    bound = 1.5 * np.median(rms)
    for v, u, o, r, c in zip(views, ups, out, rms, clipped):
        new = np.sqrt(np.mean(np.concatenate([(o[k] - v[k]).numpy().ravel() for k in v]) ** 2))
        if r > bound:
            assert c == pytest.approx(r, rel=1e-6) and new == pytest.approx(bound, rel=1e-5)
            d_old, d_new = (u["w"] - v["w"]).flatten(), (o["w"] - v["w"]).flatten()
            assert torch.nn.functional.cosine_similarity(d_old, d_new, dim=0) > 0.9999  # direction kept
        else:
            assert c is None and all(torch.equal(o[k], u[k]) for k in u)
    assert clipped[3] is not None and clipped[:3] == [None, None, None]
    two, c2 = clip_to_median(list(zip(views[2:], ups[2:])), 1.5)  # fewer than 3: the smallest is the reference
    assert c2[0] is None and c2[1] is not None
