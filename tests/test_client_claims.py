"""Clients get nothing they were not given: metrics are whitelisted, a reply may not set server-reserved keys or
claim another partition, and a reply's size is checked before it is deserialized (partition ids and budgets are
assigned by the server: tests/test_robust.py)."""
from __future__ import annotations

import pytest

from fedlowrank.federated.robust import MAX_METRIC_KEYS, RejectedReply, check_metrics

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
    with pytest.raises(RejectedReply, match="'junk' is not a number \\(list of 100000\\)"):
        check_metrics({**GOOD, "junk": [0.0] * 100_000}, 1e6, partition_id=2)  # dropped keys are capped too
    with pytest.raises(RejectedReply, match="metric keys"):
        check_metrics({**GOOD, **{f"k{i}": 0.0 for i in range(MAX_METRIC_KEYS)}}, 1e6, partition_id=2)


def _np_rms(x) -> float:
    import numpy as np
    return float(np.sqrt(np.mean(np.square(np.asarray(x, dtype=np.float64)))))


def test_clip_auto_bounds_each_group_against_numpy():
    """Dense groups: each client's change RMS is compared with the median of its group (numpy); a client over
    ``factor`` x the median has its whole change scaled by one factor (direction kept), the others are untouched."""
    import numpy as np
    import torch

    from fedlowrank.federated.clipping import clip_auto

    torch.manual_seed(0)
    views = [{"w": torch.randn(4, 3), "b": torch.randn(4)} for _ in range(4)]
    scales = [(1.0, 1.0), (1.1, 0.9), (0.9, 1.2), (1.0, 40.0)]  # the last one blows up its bias only
    ups = [{"w": v["w"] + sw * torch.randn(4, 3), "b": v["b"] + sb * torch.randn(4)}
           for v, (sw, sb) in zip(views, scales)]
    rms = {k: [_np_rms((u[k] - v[k]).numpy()) for v, u in zip(views, ups)] for k in ("w", "b")}
    ratio = [max(rms[k][i] / np.median(rms[k]) for k in rms) for i in range(4)]
    out, scaled, capped = clip_auto(list(zip(views, ups)), 1.5)
    assert capped == [0, 0, 0, 0]
    for i, (v, u, o) in enumerate(zip(views, ups, out)):
        if ratio[i] > 1.5:
            assert scaled[i] == pytest.approx(ratio[i], rel=1e-6)  # float32 differences here
            for k in ("w", "b"):  # one scale for the whole change, so its direction is kept
                np.testing.assert_allclose((o[k] - v[k]).numpy(), (1.5 / ratio[i]) * (u[k] - v[k]).numpy(),
                                           rtol=1e-5, atol=1e-6)
            assert max(_np_rms((o[k] - v[k]).numpy()) / np.median(rms[k]) for k in rms) == pytest.approx(1.5, rel=1e-5)
        else:
            assert scaled[i] is None and all(torch.equal(o[k], u[k]) for k in u)
    assert scaled[3] is not None and scaled[:3] == [None, None, None]
    _, two, _ = clip_auto(list(zip(views[2:], ups[2:])), 1.5)  # fewer than 3: the smallest is the reference
    assert two[0] is None and two[1] is not None


def test_clip_auto_caps_slots_that_one_client_trained_against_numpy():
    """Factor slots: slots 0:2 are trained by all 4 clients (median rule), slots 2:8 by client 3 alone (no median:
    capped at factor x the median relative change of slots 0:2, times the RMS of its downloaded slot values)."""
    import numpy as np
    import torch

    from fedlowrank.federated.clipping import clip_auto

    torch.manual_seed(1)
    ranks, out_f, in_f, f = [2, 2, 2, 8], 6, 5, 1.5
    views = [{"l.U": torch.randn(out_f, r), "l.V": torch.randn(r, in_f)} for r in ranks]
    ups = [{k: t + 0.1 * torch.randn_like(t) for k, t in v.items()} for v in views]
    ups[3]["l.U"][:, 2:] += 30.0 * torch.randn(out_f, 6)  # the attacker's thin slots only

    def flat(s, lo, hi):
        return np.concatenate([s["l.U"][:, lo:hi].numpy().ravel(), s["l.V"][lo:hi].numpy().ravel()])

    rel = [_np_rms(flat(u, 0, 2) - flat(v, 0, 2)) / _np_rms(flat(v, 0, 2)) for v, u in zip(views, ups)]
    bound = f * np.median(rel) * _np_rms(flat(views[3], 2, 8))
    before = _np_rms(flat(ups[3], 2, 8) - flat(views[3], 2, 8))
    assert before > 10 * bound
    out, scaled, capped = clip_auto(list(zip(views, ups)), f)
    assert scaled == [None] * 4 and capped == [0, 0, 0, 1]
    assert _np_rms(flat(out[3], 2, 8) - flat(views[3], 2, 8)) == pytest.approx(bound, rel=1e-5)
    np.testing.assert_array_equal(flat(out[3], 0, 2), flat(ups[3], 0, 2))  # its wide slots are untouched
    for i in range(3):
        assert all(torch.equal(out[i][k], ups[i][k]) for k in ups[i])


def test_reply_size_and_declared_shapes_are_checked_before_deserialization(monkeypatch):
    """``check_record`` reads sizes from the Arrays' metadata and byte lengths; no array is deserialized, so a
    512 MB reply is refused without a copy of it being made."""
    import numpy as np
    import torch
    from flwr.app import Array, ArrayRecord

    from fedlowrank.federated.robust import check_record, record_bytes

    def boom(self):
        raise AssertionError("an array was deserialized")

    expected = {"l.U": (64, 8), "l.V": (8, 32)}
    good = ArrayRecord.from_torch_state_dict({"l.U": torch.zeros(64, 8), "l.V": torch.zeros(8, 32)})
    monkeypatch.setattr(Array, "numpy", boom)
    assert check_record(good, expected, {}, 2**20) == record_bytes(good) > (64 * 8 + 8 * 32) * 4
    with pytest.raises(RejectedReply, match="max_reply_mb"):
        check_record(good, expected, {}, 1000)
    with pytest.raises(RejectedReply, match="extra=\\['x'\\]"):
        check_record(ArrayRecord({**{k: good[k] for k in good.keys()}, "x": good["l.V"]}), expected, {}, 2**20)
    with pytest.raises(RejectedReply, match="declares shape \\(64, 16\\)"):
        check_record(ArrayRecord.from_torch_state_dict({"l.U": torch.zeros(64, 16), "l.V": torch.zeros(8, 32)}),
                     expected, {}, 2**20)
    with pytest.raises(RejectedReply, match="float64"):
        check_record(ArrayRecord.from_torch_state_dict({"l.U": torch.zeros(64, 8, dtype=torch.float64),
                                                        "l.V": torch.zeros(8, 32)}), expected, {}, 2**20)
    big = Array.from_numpy_ndarray(np.zeros((1000, 1000), np.float32))  # 4 MB of data declared as (64, 8)
    big.shape = (64, 8)
    with pytest.raises(RejectedReply, match="carries 4000... bytes"):
        check_record(ArrayRecord({"l.U": big, "l.V": good["l.V"]}), expected, {}, 2**30)


def test_a_second_reply_from_the_same_sender_is_rejected_and_logged(tmp_path, caplog):
    """The same reply delivered twice counted as 5 valid updates from 4 clients: the strategy keeps one reply per
    sender per round, and the round aggregates exactly as it does without the copy."""
    import copy
    import logging

    import torch

    from fedlowrank.runtime.inprocess import InProcessGrid, make_strategy

    from helpers import fed_run as _run

    run = _run(tmp_path, "fed.num_clients=4", "fed.local_steps=2")
    a, b, grid = make_strategy(run), make_strategy(run), InProcessGrid(run)
    replies = grid.send_and_receive(list(a.configure_train(1, None, None, grid)))
    b.configure_train(1, None, None, grid)
    own = copy.deepcopy(replies)  # aggregate_train releases the arrays of the replies it accepts
    with caplog.at_level(logging.WARNING):
        a.aggregate_train(1, replies + [replies[-1]])  # the last client's reply, delivered twice
    b.aggregate_train(1, own)
    assert a.history[-1]["clients_ok"] == 4 and a.history[-1]["rejected"] == 1
    assert "second reply from client" in caplog.text
    assert all(torch.equal(a.global_state[k], b.global_state[k]) for k in a.global_state)
