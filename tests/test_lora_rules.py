"""Heterogeneous LoRA rules against independent numpy computations on the same replies (dense ΔW matrices,
numpy's SVD), and the α/r convention between what the server sends and what a client computes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlowrank.federated import lora_rules as L

pytestmark = pytest.mark.timeout(60)
ALPHA = 16.0
OUT, IN, R = 12, 9, 6
RANKS = [2, 4, 6]
W = [3.0, 1.0, 2.0]


def _replies(seed: int = 0, ffa_A: np.ndarray | None = None):
    rng = np.random.default_rng(seed)
    reps = []
    for r in RANKS:
        B = rng.normal(size=(OUT, r))
        A = ffa_A[:r] if ffa_A is not None else rng.normal(size=(r, IN))
        reps.append({"l.adapter.U": torch.tensor(B), "l.adapter.V": torch.tensor(A)})
    return reps


def _global(seed: int = 1):
    rng = np.random.default_rng(seed)
    return {"l.adapter.U": torch.tensor(rng.normal(size=(OUT, R))), "l.adapter.V": torch.tensor(rng.normal(size=(R, IN)))}


def _np_delta(st) -> np.ndarray:
    B, A = st["l.adapter.U"].numpy(), st["l.adapter.V"].numpy()
    return ALPHA / B.shape[1] * B @ A


def _np_truncate(M: np.ndarray, r: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(M, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r]


def test_fedit_averages_scaled_zero_padded_factors_separately():
    reps, g = _replies(), _global()
    new = L.aggregate("fedit", g, reps, W, ALPHA)
    p = np.array(W) / sum(W)
    Bp = sum(pk * np.sqrt(ALPHA / r) * np.pad(u["l.adapter.U"].numpy(), ((0, 0), (0, R - r)))
             for pk, r, u in zip(p, RANKS, reps))
    Ap = sum(pk * np.sqrt(ALPHA / r) * np.pad(u["l.adapter.V"].numpy(), ((0, R - r), (0, 0)))
             for pk, r, u in zip(p, RANKS, reps))
    np.testing.assert_allclose(_np_delta(new), Bp @ Ap, atol=1e-10)
    exact = sum(pk * _np_delta(u) for pk, u in zip(p, reps))
    assert np.abs(_np_delta(new) - exact).max() > 0.1  # the inexact baseline really is inexact


def test_hetlora_weights_by_each_clients_delta_norm():
    reps, g = _replies(2), _global()
    new = L.aggregate("hetlora", g, reps, W, ALPHA)
    norms = np.array([np.linalg.norm(_np_delta(u)) for u in reps])
    p = norms / norms.sum()
    Bp = sum(pk * np.sqrt(ALPHA / r) * np.pad(u["l.adapter.U"].numpy(), ((0, 0), (0, R - r)))
             for pk, r, u in zip(p, RANKS, reps))
    Ap = sum(pk * np.sqrt(ALPHA / r) * np.pad(u["l.adapter.V"].numpy(), ((0, R - r), (0, 0)))
             for pk, r, u in zip(p, RANKS, reps))
    np.testing.assert_allclose(_np_delta(new), Bp @ Ap, atol=1e-10)
    # data-size weights give another answer: the norm weights are really used
    assert np.abs(_np_delta(new) - _np_delta(L.aggregate("fedit", g, reps, W, ALPHA))).max() > 1e-3


def test_flexlora_is_the_truncated_svd_of_the_weighted_deltas_and_clients_get_the_top_r():
    reps, g = _replies(3), _global()
    new = L.aggregate("flexlora", g, reps, W, ALPHA)
    p = np.array(W) / sum(W)
    M = sum(pk * _np_delta(u) for pk, u in zip(p, reps))  # the reference: Σ p_k (α/r_k) B_k A_k
    np.testing.assert_allclose(_np_delta(new), _np_truncate(M, R), atol=1e-9)
    for r in (1, 3, 6):
        v = L.view("flexlora", new, {"l": r}, ALPHA)
        assert v["l.adapter.U"].shape == (OUT, r) and v["l.adapter.V"].shape == (r, IN)
        np.testing.assert_allclose(_np_delta(v), _np_truncate(M, r), atol=1e-9)
        # the reference's split: A = V_rᵀ has orthonormal rows, B = U_r S_r / (α/r)
        A = v["l.adapter.V"].numpy()
        np.testing.assert_allclose(A @ A.T, np.eye(r), atol=1e-9)


def test_ffa_keeps_the_shared_a_and_is_exact():
    g = _global()
    A = g["l.adapter.V"].numpy()
    reps = [{"l.adapter.U": u["l.adapter.U"]} for u in _replies(4, ffa_A=A)]
    new = L.aggregate("ffa", g, reps, W, ALPHA)
    assert torch.equal(new["l.adapter.V"], g["l.adapter.V"])
    p = np.array(W) / sum(W)
    exact = sum(pk * ALPHA / r * u["l.adapter.U"].numpy() @ A[:r] for pk, r, u in zip(p, RANKS, reps))
    np.testing.assert_allclose(_np_delta(new), exact, atol=1e-10)
    v = L.view("ffa", new, {"l": 2}, ALPHA)
    assert torch.equal(v["l.adapter.V"], g["l.adapter.V"][:2])  # the frozen A, unscaled


def test_product_adds_each_clients_change_to_the_global_delta():
    g, reps = _global(), _replies(5)
    views = [L.view("product", g, {"l": r}, ALPHA) for r in RANKS]
    for r, v in zip(RANKS, views):  # the download is the best rank-r approximation of the global ΔW
        np.testing.assert_allclose(_np_delta(v), _np_truncate(_np_delta(g), r), atol=1e-9)
    new = L.aggregate("product", g, reps, W, ALPHA, views)
    p = np.array(W) / sum(W)
    M = _np_delta(g) + sum(pk * (_np_delta(u) - _np_delta(v)) for pk, u, v in zip(p, reps, views))
    np.testing.assert_allclose(_np_delta(new), _np_truncate(M, R), atol=1e-9)
    # untrained replies (equal to the downloads) leave the global ΔW as it was
    same = L.aggregate("product", g, views, W, ALPHA, views)
    np.testing.assert_allclose(_np_delta(same), _np_delta(g), atol=1e-9)


@pytest.mark.parametrize("rule", ["fedit", "hetlora", "ffa"])
def test_a_download_computes_the_global_deltas_first_slots_at_the_clients_own_scale(rule):
    """α/r consistency: a client of rank r computes (α/r)·B·A from its download; that must be the global
    adapter's first r slots at the global scale, s_R·B_g[:, :r]·A_g[:r], whatever r is."""
    g = _global()
    Bg, Ag = g["l.adapter.U"].numpy(), g["l.adapter.V"].numpy()
    for r in (1, 3, R):
        v = L.view(rule, g, {"l": r}, ALPHA)
        np.testing.assert_allclose(_np_delta(v), ALPHA / R * Bg[:, :r] @ Ag[:r], atol=1e-10)
    # a round in which every client sends back what it downloaded, all at the global rank: nothing changes
    views = [L.view(rule, g, {"l": R}, ALPHA) for _ in RANKS]
    back = [{k: x for k, x in v.items() if rule != "ffa" or k.endswith(".U")} for v in views]
    np.testing.assert_allclose(_np_delta(L.aggregate(rule, g, back, W, ALPHA)), _np_delta(g), atol=1e-10)


@pytest.mark.parametrize("rule", ["fedit", "flexlora", "product"])
def test_fixed_scaling_uses_alpha_itself_for_every_rank(rule):
    """``method.scaling=fixed`` (FLoRA's code: lora_alpha = 2r, s = 2): ΔW = s·B·A whatever r, on the server's side
    (aggregate, download) as on the client's; numpy with s = 2 gives the same sums."""
    s = L.run_alpha(2.0, "fixed")
    assert L.lora_scale(s, 4) == L.lora_scale(s, 64) == 2.0 and L.lora_scale(L.run_alpha(2.0, "rank"), 4) == 0.5
    g, reps = _global(), _replies()
    views = [L.view(rule, g, {"l": r}, s) for r in RANKS]
    new = L.aggregate(rule, g, reps, W, s, views)
    d = lambda st: 2.0 * st["l.adapter.U"].numpy() @ st["l.adapter.V"].numpy()  # noqa: E731
    p = np.array(W) / sum(W)
    if rule == "flexlora":  # the truncated SVD of Σ p_k s B_k A_k at the global rank
        want = _np_truncate(sum(pk * d(u) for pk, u in zip(p, reps)), R)
    elif rule == "product":  # the global ΔW plus each client's change of ΔW, truncated
        want = _np_truncate(d(g) + sum(pk * (d(u) - d(v)) for pk, u, v in zip(p, reps, views)), R)
    else:  # zero-padded √s-scaled factors averaged separately (s the same for every client)
        pad = lambda x, r: np.pad(x, ((0, 0), (0, R - r))) if x.shape[0] == OUT else np.pad(x, ((0, R - r), (0, 0)))  # noqa: E731
        Bm = sum(pk * pad(u["l.adapter.U"].numpy(), r) for pk, u, r in zip(p, reps, RANKS))
        Am = sum(pk * pad(u["l.adapter.V"].numpy(), r) for pk, u, r in zip(p, reps, RANKS))
        want = 2.0 * Bm @ Am
    np.testing.assert_allclose(d(new), want, atol=1e-8)
    for r, v in zip(RANKS, views):  # zero-padding rules: a download holds the global ΔW's first r slots
        if rule == "fedit":
            np.testing.assert_allclose(d(v), 2.0 * g["l.adapter.U"].numpy()[:, :r] @ g["l.adapter.V"].numpy()[:r],
                                       atol=1e-10)


def test_unknown_rule_and_bad_weights_are_refused():
    with pytest.raises(ValueError, match="unknown LoRA rule"):
        L.view("fedavg", _global(), {"l": 2}, ALPHA)
    with pytest.raises(ValueError, match="weights"):
        L.aggregate("fedit", _global(), _replies(), [0.0, 0.0, 0.0], ALPHA)


def test_flora_merges_the_exact_weighted_sum_and_stays_thin():
    """FLoRA: the stacked replies add Σ p_k (α/r_k) B_k A_k to the merged ΔW exactly, round after round; past
    min(out, in) directions the factors are re-factorized without changing ΔW."""
    g = {"l.merged.U": torch.zeros(OUT, 1, dtype=torch.float64), "l.merged.V": torch.zeros(1, IN, dtype=torch.float64)}
    p = np.array(W) / sum(W)
    expect = np.zeros((OUT, IN))
    for rnd in range(3):  # 12 directions a round: wider than IN = 9 from the first round on
        reps = _replies(10 + rnd)
        assert L.view("flora", g, {"l": 2}, ALPHA).keys() == g.keys()  # everyone downloads the merged factors
        g = L.aggregate("flora", g, reps, W, ALPHA)
        expect += sum(pk * _np_delta(u) for pk, u in zip(p, reps))
        np.testing.assert_allclose(L.merged_delta(g, "l").numpy(), expect, atol=1e-9)
        assert g["l.merged.U"].shape[1] <= min(OUT, IN)


def test_change_norm_is_the_frobenius_norm_of_the_delta_change():
    g, reps = _global(), _replies(6)
    for u in reps:
        v = L.view("fedit", g, {"l": u["l.adapter.U"].shape[1]}, ALPHA)
        want = np.linalg.norm(_np_delta(u) - _np_delta(v))
        assert L.change_norm(u, v, "l", ALPHA) == pytest.approx(want, rel=1e-10)
        assert L.change_norm(u, {}, "l", ALPHA) == pytest.approx(np.linalg.norm(_np_delta(u)), rel=1e-10)


@pytest.mark.parametrize("rule", ["fedit", "ffa", "flora"])
def test_clipping_acts_on_each_clients_delta_change(rule):
    """ΔW-space clipping: an honest round (similar change sizes) is untouched; one client's change blown up 50x is
    brought to 1.5x the median ΔW change norm (exactly for ffa and flora, where ΔW is linear in the change)."""
    g = _global() if rule != "flora" else {}
    rng = np.random.default_rng(7)
    pairs = []
    for i in range(4):
        v = L.view(rule, g, {"l": R}, ALPHA) if g else {}
        u = {}
        for k, t in (v.items() if v else {"l.adapter.U": torch.zeros(OUT, R), "l.adapter.V": torch.zeros(R, IN)}.items()):
            if rule == "ffa" and k.endswith(".V"):
                continue
            noise = torch.tensor(rng.normal(size=t.shape)) * 0.1
            u[k] = t.double() + noise if (v or k.endswith(".U")) else torch.tensor(rng.normal(size=t.shape))
        pairs.append((v, u))
    honest, scaled, _ = L.clip_auto(pairs, 1.5, ALPHA)
    assert scaled == [None] * 4 and all(h is u for h, (_, u) in zip(honest, pairs))
    v3, u3 = pairs[3]
    pairs[3] = (v3, {k: (v3[k].double() + 50 * (t - v3[k].double())) if k in v3 else 50 * t if k.endswith(".U") else t
                     for k, t in u3.items()})
    out, scaled, _ = L.clip_auto(pairs, 1.5, ALPHA)
    assert scaled[:3] == [None] * 3 and scaled[3] > 10
    norms = sorted(L.change_norm(u, v, "l", ALPHA) for v, u in pairs[:3])
    ref = sorted([*norms, L.change_norm(pairs[3][1], v3, "l", ALPHA)])[1]  # the round's lower median
    assert L.change_norm(out[3], v3, "l", ALPHA) == pytest.approx(1.5 * ref, rel=1e-6)
