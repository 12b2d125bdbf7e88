"""Math of the factorized core: forward, SVD init, spectrum, decay, rank changes, accounting."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from fedlowrank.lowrank import (
    LowRankConv2d, LowRankLinear, count_flops, count_params, densify, explained_rank, factored_svd,
    factored_svdvals, factorize, frobenius_decay, lowrank_modules, rank_from_budget, refactorize_sum,
)



@pytest.fixture(autouse=True)
def _float64():
    """Exact comparisons in float64, restored afterwards so other test modules are unaffected."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_linear_forward_equals_merged_dense():
    layer = LowRankLinear(13, 7, rank=3)
    x = torch.randn(5, 4, 13)
    assert rel(layer(x), layer.merge()(x)) < 1e-12
    assert rel(layer(x), x @ (layer.U @ layer.V).T + layer.bias) < 1e-12


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 0, 1), (1, 2, 2)])
def test_conv_forward_equals_merged_dense(stride, padding, dilation):
    layer = LowRankConv2d(3, 8, 3, rank=4, stride=stride, padding=padding, dilation=dilation)
    x = torch.randn(2, 3, 11, 11)
    assert rel(layer(x), layer.merge()(x)) < 1e-12


def test_from_dense_full_rank_is_exact_and_truncation_is_optimal():
    dense = nn.Linear(20, 12)
    full = LowRankLinear.from_dense(dense, ratio=1.0)
    x = torch.randn(6, 20)
    assert full.rank == 12 and rel(full(x), dense(x)) < 1e-10
    r = 5
    low = LowRankLinear.from_dense(dense, rank=r)
    s = torch.linalg.svdvals(dense.weight.detach())
    err = (low.weight_2d() - dense.weight).norm().item()
    assert math.isclose(err, s[r:].norm().item(), rel_tol=1e-9)  # Eckart–Young


def test_conv_from_dense_keeps_function_at_full_rank():
    conv = nn.Conv2d(4, 6, 3, padding=1, stride=2)
    lr = LowRankConv2d.from_dense(conv, ratio=1.0)
    x = torch.randn(2, 4, 9, 9)
    assert rel(lr(x), conv(x)) < 1e-10


@pytest.mark.parametrize("m,n,r", [(50, 30, 7), (8, 40, 8), (33, 33, 33), (64, 16, 20)])
def test_spectrum_from_thin_factors_matches_dense_svdvals(m, n, r):
    U, V = torch.randn(m, r), torch.randn(r, n)
    ref = torch.linalg.svdvals(U @ V)
    got = factored_svdvals(U, V)
    k = min(m, n, r)
    assert got.shape[0] == k
    assert torch.allclose(got, ref[:k], rtol=1e-9, atol=1e-9)
    P, S, Qh = factored_svd(U, V)
    assert rel(P @ torch.diag(S) @ Qh, U @ V) < 1e-10
    assert torch.allclose(P.T @ P, torch.eye(k), atol=1e-10)


def test_frobenius_decay_equals_dense_formula_with_gradients():
    layer = LowRankLinear(17, 9, rank=4)
    with torch.no_grad():  # random, non-orthogonal factors: UᵀU and VVᵀ are not diagonal
        layer.U.copy_(torch.randn_like(layer.U))
        layer.V.copy_(torch.randn_like(layer.V))
    fd = layer.frobenius_decay()
    dense = (layer.U @ layer.V).pow(2).sum()
    assert math.isclose(fd.item(), dense.item(), rel_tol=1e-12)
    gU, gV = torch.autograd.grad(fd, [layer.U, layer.V])
    dU, dV = torch.autograd.grad(dense, [layer.U, layer.V])
    assert rel(gU, dU) < 1e-10 and rel(gV, dV) < 1e-10
    model = nn.Sequential(layer, nn.ReLU(), LowRankConv2d(2, 3, 3, rank=2))
    total = frobenius_decay(model)
    expect = sum((m.U @ m.V).pow(2).sum() for m in lowrank_modules(model).values())
    assert math.isclose(total.item(), expect.item(), rel_tol=1e-12)


def test_truncate_grow_set_rank():
    layer = LowRankLinear(30, 20, rank=10)
    W = layer.weight_2d().detach().clone()
    layer.truncate(4)
    s = torch.linalg.svdvals(W)
    assert layer.rank == 4
    assert math.isclose((layer.weight_2d() - W).norm().item(), s[4:].norm().item(), rel_tol=1e-8)
    before = layer.weight_2d().detach().clone()
    layer.grow(9)
    assert layer.rank == 9 and rel(layer.weight_2d(), before) < 1e-12  # function unchanged
    assert layer.V[4:].abs().sum() > 0 and layer.U[:, 4:].abs().sum() == 0  # new slots get gradients
    layer.set_rank(2)
    assert layer.rank == 2
    with pytest.raises(ValueError):
        layer.grow(25)
    with pytest.raises(ValueError):
        layer.truncate(0)


def test_rank_budget_validation():
    assert rank_from_budget(64, ratio=0.1) == 7
    assert rank_from_budget(64, ratio=1.0) == 64
    assert rank_from_budget(10, rank=50) == 10
    for bad in ({"rank": 0}, {"rank": -3}, {"ratio": 1.5}, {"ratio": 0.0}, {}):
        with pytest.raises(ValueError):
            rank_from_budget(10, **bad)


def _toy():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2),
                         nn.Flatten(), nn.Linear(8 * 6 * 6, 32), nn.ReLU(), nn.Linear(32, 5))


def test_factorize_any_model_hybrid_and_densify_roundtrip():
    model = _toy()
    x = torch.randn(2, 3, 6, 6)
    replaced = factorize(model, ratio=1.0, skip=[r"^6$"])
    assert replaced == ["0", "4"]  # grouped conv kept dense, head skipped
    assert isinstance(model[0], LowRankConv2d) and isinstance(model[4], LowRankLinear)
    assert isinstance(model[2], nn.Conv2d) and isinstance(model[6], nn.Linear)
    y = model(x)
    densify(model)
    assert not lowrank_modules(model) and rel(model(x), y) < 1e-10
    m2 = _toy()
    assert factorize(m2, rank=2, targets=["4"]) == ["4"]
    with pytest.raises(ValueError):
        factorize(_toy(), rank=2, targets=["nope"])
    with pytest.raises(ValueError):
        factorize(_toy(), rank=2, ratio=0.5)


def test_param_and_flop_counts():
    m, n, r, B = 64, 48, 8, 5
    dense = nn.Linear(n, m, bias=False)
    low = LowRankLinear(n, m, r, bias=False)
    x = torch.randn(B, n)
    assert count_flops(dense, x) == 2 * B * m * n
    assert count_flops(low, x) == 2 * B * r * (m + n) == B * low.flops_per_token()
    assert count_params(low) == r * (m + n)
    conv = LowRankConv2d(3, 16, 3, rank=4, padding=1, bias=False)
    xc = torch.randn(1, 3, 8, 8)
    assert count_flops(conv, xc) == 64 * conv.flops_per_position()


def test_refactorize_sum_is_best_approximation_of_weighted_sum():
    m, n = 20, 15
    Us = [torch.randn(m, r) for r in (2, 4, 6)]
    Vs = [torch.randn(r, n) for r in (2, 4, 6)]
    w = [0.2, 0.3, 0.5]
    avg = sum(wi * U @ V for wi, U, V in zip(w, Us, Vs))
    U, V = refactorize_sum(Us, Vs, w, 12)  # Σ r = 12 ≥ rank(avg): exact
    assert rel(U @ V, avg) < 1e-10
    U5, V5 = refactorize_sum(Us, Vs, w, 5)
    s = torch.linalg.svdvals(avg)
    assert math.isclose((U5 @ V5 - avg).norm().item(), s[5:].norm().item(), rel_tol=1e-8)


def test_explained_rank():
    S = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert explained_rank(S, 0.5) == 1
    assert explained_rank(S, 0.9) == 2  # 13/14 = 0.93
    assert explained_rank(S, 0.95) == 3
    with pytest.raises(ValueError):
        explained_rank(S, 1.5)


def _reference_explained_variance(s: np.ndarray, k: int) -> float:
    """InRank reference: 1 - var(s - s_current) / var(s), s_current = s with s[k:] zeroed."""
    cur = s.copy()
    cur[k:] = 0
    return 1.0 - np.var(s - cur, ddof=1) / np.var(s, ddof=1)


def test_explained_variance_rule_matches_the_reference_formula():
    from fedlowrank.lowrank import explained_variance_rank, explained_variance_ratios

    rng = np.random.default_rng(0)
    for r, n_total in ((6, 6), (12, 40), (30, 64)):
        S = np.sort(rng.gamma(0.5, size=r))[::-1]
        padded = np.concatenate([S, np.zeros(n_total - r)])  # the reference's svdvals of a dense product
        ratios = explained_variance_ratios(torch.tensor(S.copy()), n_total).numpy()
        for k in range(1, r + 1):
            assert ratios[k] == pytest.approx(_reference_explained_variance(padded, k), abs=1e-12)
        for thr in (0.5, 0.8, 0.9, 0.99):
            hit = [k for k in range(1, r + 1) if _reference_explained_variance(padded, k) > thr]
            assert explained_variance_rank(torch.tensor(S.copy()), thr, n_total) == (hit[0] if hit else r)
    # not the energy rule: a slowly decaying spectrum needs different k under the two rules
    S = torch.linspace(1.0, 0.1, 20)
    assert explained_variance_rank(S, 0.9, 20) != explained_rank(S, 0.9)


@pytest.mark.parametrize("method", ["dense", "fixed", "inrank", "relora", "relora_scaled", "welore"])
def test_accounting_dense_is_the_plain_models_count_and_params_what_the_run_keeps(method):
    """``params_if_dense`` equals the untouched dense model's parameter count whatever each method did to the layers
    (a LoRA adapter is extra, never a dense layer of its own: the old count called a ReLoRA model's dense size
    base + out x in per adapter); ``params`` is every parameter the model now holds."""
    import copy

    from fedlowrank.lowrank import add_lora, compression_summary, count_params, factorize
    from fedlowrank.methods.welore import WeLoreConfig, welore_compress
    from fedlowrank.models.llama import Llama, LlamaConfig

    torch.manual_seed(0)
    plain = Llama(LlamaConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, dim=32, hidden_dim=64))
    dense = sum(p.numel() for p in plain.parameters())
    model = copy.deepcopy(plain)
    if method == "fixed":
        factorize(model, ratio=0.25, targets=[r"attn\.", r"mlp\."])
    elif method == "inrank":
        factorize(model, rank=3, targets=[r"attn\.", r"mlp\."])
    elif method.startswith("relora"):
        add_lora(model, r=4, targets=[r"attn\.", r"mlp\."], trainable_scaling=method == "relora_scaled")
    elif method == "welore":
        welore_compress(model, WeLoreConfig(target_reduction=0.5, tolerance=0.5))
    comp = compression_summary(model)
    held = sum(p.numel() for p in model.parameters())
    assert comp["params_if_dense"] == dense and comp["params"] == held == count_params(model)
    if method.startswith("relora"):
        adapters = sum(p.numel() for n, p in model.named_parameters() if ".adapter." in n or "scale_param" in n)
        assert held == dense + adapters and comp["adapter_params"] == adapters > 0
    elif method != "dense":
        assert held < dense
