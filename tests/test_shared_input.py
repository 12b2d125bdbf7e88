"""Layers sharing an input (q/k/v, gate/up) computed with one GEMM: exactly the per-layer result,
gradients included, with fewer matmuls; and LLaMA is the same model with the fusion on or off."""
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fedlowrank.lowrank import LoRALinear, LowRankLinear, factorize, lowrank_modules, shared_input_linear
from fedlowrank.models.llama import Llama, LlamaConfig

MATMULS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear"}


class CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in MATMULS:
            self.n += 1
        return func(*args, **(kwargs or {}))


def _layers(kind):
    torch.manual_seed(0)
    if kind == "lowrank":  # unequal ranks, biases: what InRank produces
        return [LowRankLinear(12, 12, 3), LowRankLinear(12, 8, 5), LowRankLinear(12, 12, 2, bias=False)]
    if kind == "dense":
        return [nn.Linear(12, 12), nn.Linear(12, 8), nn.Linear(12, 12)]
    if kind == "dense_nobias":
        return [nn.Linear(12, 12, bias=False), nn.Linear(12, 20, bias=False)]
    base = nn.Linear(12, 6)  # mixed: two factorized, one dense, one LoRA
    return [LowRankLinear(12, 12, 4), nn.Linear(12, 5), LowRankLinear(12, 7, 6), LoRALinear(base, 2)]


@pytest.mark.parametrize("kind", ["lowrank", "dense", "dense_nobias", "mixed"])
def test_shared_input_equals_separate_layers_with_gradients(kind):
    layers = [m.double() for m in _layers(kind)]
    for m in layers:
        if isinstance(m, LoRALinear):
            nn.init.normal_(m.adapter.U)  # make the adapter non-zero
    params = [p for m in layers for p in m.parameters() if p.requires_grad]
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    gy = [torch.randn(2, 5, m(x).shape[-1], dtype=torch.float64) for m in layers]

    def run(fn):
        ys = fn()
        grads = torch.autograd.grad(sum((y * g).sum() for y, g in zip(ys, gy)), [x, *params])
        return ys, grads

    ref_y, ref_g = run(lambda: [m(x) for m in layers])
    y, g = run(lambda: shared_input_linear(x, layers))
    assert [t.shape for t in y] == [t.shape for t in ref_y]
    for a, b in zip([*y, *g], [*ref_y, *ref_g]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind,separate,fused", [("lowrank", 6, 4), ("dense", 3, 1), ("mixed", 1 + 2 + 2 + 3, 1 + 2 + 1 + 3)])
def test_shared_input_saves_gemms(kind, separate, fused):
    layers = _layers(kind)
    x = torch.randn(4, 12)
    with CountMatmuls() as c_sep:
        [m(x) for m in layers]
    with CountMatmuls() as c_fused:
        shared_input_linear(x, layers)
    assert (c_sep.n, c_fused.n) == (separate, fused)


def test_nested_active_rank_is_respected():
    layers = [LowRankLinear(10, 10, 4).double(), LowRankLinear(10, 6, 5).double()]
    for m, k in zip(layers, (2, 3)):
        m.set_active_rank(k)
    x = torch.randn(3, 10, dtype=torch.float64)
    for a, b in zip(shared_input_linear(x, layers), [m(x) for m in layers]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("factorized", [False, True])
def test_llama_fused_and_unfused_are_the_same_model(factorized):
    cfg = dict(vocab_size=50, block_size=16, n_layer=2, n_head=2, dim=16, hidden_dim=24)
    torch.manual_seed(1)
    fused = Llama(LlamaConfig(**cfg, fuse_shared_input=True)).double()
    if factorized:
        factorize(fused, ratio=0.5)
        for i, m in enumerate(lowrank_modules(fused).values()):  # unequal ranks inside each group
            m.set_rank(max(1, m.rank - i % 3))
    plain = Llama(LlamaConfig(**cfg, fuse_shared_input=False)).double()
    if factorized:
        factorize(plain, rank=1)
        for name, m in lowrank_modules(fused).items():
            plain.get_submodule(name).set_rank(m.rank)
    plain.load_state_dict(fused.state_dict())
    idx = torch.randint(0, 50, (2, 16))
    a, b = fused(idx), plain(idx)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    a.square().mean().backward()
    b.square().mean().backward()
    for (n, p), q in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=n)
    with CountMatmuls() as cf:
        fused(idx)
    with CountMatmuls() as cp:
        plain(idx)
    saved = (3 - 1 + 2 - 1) * 2  # per block: q/k/v share one GEMM, gate/up share one
    assert cp.n - cf.n == saved
