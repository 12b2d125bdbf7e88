"""Triton fused low-rank linear vs the torch reference: interpreter on CPU, real kernel on CUDA."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

INTERP_SCRIPT = r"""
import torch
from fedlowrank.kernels import kernel_available, lowrank_linear, lowrank_linear_ref
torch.manual_seed(0)
cases = [(37, 40, 50, 5, True, torch.float32, 1e-5), (16, 64, 33, 20, False, torch.float32, 1e-5),
         (20, 48, 40, 8, True, torch.bfloat16, 2e-2)]
for M, K, N, R, bias, dt, tol in cases:
    x = torch.randn(2, M, K, dtype=dt, requires_grad=True)
    U = torch.randn(N, R, dtype=dt, requires_grad=True)
    V = torch.randn(R, K, dtype=dt, requires_grad=True)
    b = torch.randn(N, dtype=dt, requires_grad=True) if bias else None
    assert kernel_available(x, R)
    y = lowrank_linear(x, U, V, b)
    assert y.shape == (2, M, N) and torch.isfinite(y).all()
    w = torch.randn_like(y, dtype=torch.float64)
    (y.double() * w).sum().backward()
    ps = [x, U, V] + ([b] if bias else [])
    got = [p.grad.double().clone() for p in ps]
    ref_in = [p.detach().double().requires_grad_() for p in ps]
    ref = lowrank_linear_ref(ref_in[0], ref_in[1], ref_in[2], ref_in[3] if bias else None)
    (ref * w).sum().backward()
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert err < tol, (M, K, N, R, dt, err)
    for g, r in zip(got, ref_in):
        gerr = ((g - r.grad).norm() / r.grad.norm()).item()
        assert gerr < tol * 3, ("grad", M, K, N, R, dt, gerr)
print("INTERPRETER_OK")
"""


def test_kernel_matches_reference_in_triton_interpreter():
    triton = pytest.importorskip("triton")
    if tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 8):
        pytest.skip(f"the interpreter path is tested with the project's triton (>=3.8), found {triton.__version__}")
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", INTERP_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "INTERPRETER_OK" in proc.stdout


def test_cpu_without_interpreter_falls_back_to_reference():
    from fedlowrank.kernels import kernel_available, lowrank_linear, lowrank_linear_ref
    from fedlowrank.lowrank import LowRankLinear

    x = torch.randn(3, 10)
    layer = LowRankLinear(10, 6, rank=2)
    layer.use_kernel = True
    if os.environ.get("TRITON_INTERPRET") != "1":
        assert not kernel_available(x, 2)
    assert torch.allclose(layer(x), lowrank_linear_ref(x, layer.U, layer.V, layer.bias))
    assert torch.allclose(lowrank_linear(x, layer.U, layer.V), x @ layer.V.T @ layer.U.T, atol=1e-6)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("M,K,N,R", [(4096, 768, 3072, 64), (1000, 1024, 1024, 130), (77, 512, 2048, 16),
                                     (8192, 1280, 5120, 256), (513, 300, 700, 7)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_cuda_kernel_forward_backward(M, K, N, R, dtype, tol):
    from fedlowrank.kernels import lowrank_linear, lowrank_linear_ref

    torch.backends.cuda.matmul.allow_tf32 = False
    dev = "cuda"
    x = torch.randn(M, K, device=dev, dtype=dtype, requires_grad=True)
    U = (torch.randn(N, R, device=dev) / R**0.5).to(dtype).requires_grad_()
    V = (torch.randn(R, K, device=dev) / K**0.5).to(dtype).requires_grad_()
    b = torch.randn(N, device=dev, dtype=dtype, requires_grad=True)
    y = lowrank_linear(x, U, V, b)
    w = torch.randn(M, N, device=dev, dtype=torch.float64)
    (y.double() * w).sum().backward()
    ps = [x, U, V, b]
    ref_in = [p.detach().double().requires_grad_() for p in ps]
    ref = lowrank_linear_ref(*ref_in)
    (ref * w).sum().backward()
    assert torch.isfinite(y).all()
    assert ((y.double() - ref).norm() / ref.norm()).item() < tol
    for p, r in zip(ps, ref_in):
        assert ((p.grad.double() - r.grad).norm() / r.grad.norm()).item() < 3 * tol


@cuda
@pytest.mark.gpu
def test_cuda_kernel_in_gpt2_training_under_autocast(tmp_path):
    from hydra import compose, initialize_config_dir

    from fedlowrank.central import central_run_from_cfg, launch

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=gpt2_fixed", "model.size=mini", "trainer.max_steps=30",
                                           "trainer.progress=false", "trainer.use_kernels=true",
                                           f"out_dir={tmp_path}", "trainer.eval_interval=30"])
    res = launch(central_run_from_cfg(cfg))
    assert res["losses"][-1][1] < res["losses"][0][1] - 0.5
