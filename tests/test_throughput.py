"""Counted model FLOPs against the PaLM/nanoGPT formula, MFU arithmetic, whole-run FLOPs in the
trainer's summary, and the GPU-style lazy non-finite check (no host sync per step)."""
import pytest
import torch
from torch import nn

from fedlowrank.central import launch
from fedlowrank.central.throughput import device_peak_flops, mfu, train_flops_per_token
from fedlowrank.central.trainer import Trainer
from fedlowrank.checkpoint import latest_complete
from fedlowrank.lowrank import LowRankLinear, factorize
from fedlowrank.models.gpt2 import GPT2, GPT2Config
from fedlowrank.models.llama import Llama, LlamaConfig
from helpers import central_run

CPU = torch.device("cpu")


def matmul_params(model):
    n = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            n += m.weight.numel()
        elif isinstance(m, LowRankLinear):
            n += m.U.numel() + m.V.numel()
    return n


def gpt2(**kw):
    torch.manual_seed(0)
    return GPT2(GPT2Config(vocab_size=100, block_size=32, n_layer=2, n_head=2, n_embd=16, **kw))


def test_dense_gpt2_flops_match_palm_formula():
    m, T = gpt2(), 32
    assert train_flops_per_token(m, T, CPU) == 6 * matmul_params(m) + 12 * 2 * T * 16


def test_factorized_and_frozen_layers_count_what_runs():
    T = 24
    m = gpt2()
    factorize(m, ratio=0.25, skip=["lm_head"])
    assert train_flops_per_token(m, T, CPU) == 6 * matmul_params(m) + 12 * 2 * T * 16
    frozen = gpt2()
    full = train_flops_per_token(frozen, T, CPU)
    n_fc = sum(b.mlp.c_fc.weight.numel() for b in frozen.h)
    for b in frozen.h:
        b.mlp.c_fc.weight.requires_grad_(False)
    assert full - train_flops_per_token(frozen, T, CPU) == 2 * n_fc  # no weight gradient for frozen weights


@pytest.mark.parametrize("fuse", [True, False])
def test_llama_flops_formula_and_fusion_changes_no_flops(fuse):
    torch.manual_seed(0)
    m, T = Llama(LlamaConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, dim=16, hidden_dim=40,
                             fuse_shared_input=fuse)), 16
    factorize(m, ratio=0.5, targets=[r"layers\.0\."])
    assert train_flops_per_token(m, T, CPU) == 6 * matmul_params(m) + 12 * 2 * T * 16


def test_counting_leaves_training_state_alone():
    m = gpt2(dropout=0.5)
    m.train()
    rng = torch.get_rng_state()
    train_flops_per_token(m, 8, CPU)
    assert m.training and all(p.grad is None for p in m.parameters())
    assert torch.equal(rng, torch.get_rng_state())


def test_peak_and_mfu(monkeypatch):
    assert device_peak_flops(CPU) is None and mfu(1e12, 1.0, None) is None
    assert device_peak_flops(CPU, 2.0) == 2e12
    for name, peak in (("NVIDIA H100 80GB HBM3", 989.4e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989.4e12),
                       ("NVIDIA A100-SXM4-80GB", 312e12), ("Some Future GPU", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d, n=name: n)
        assert device_peak_flops(torch.device("cuda")) == peak
    assert mfu(3e14, 2.0, 1e15, world=2) == pytest.approx(0.075)


def test_trainer_reports_whole_run_flops_and_mfu(tmp_path):
    common = ["experiment=gpt2_fixed", "model.ratio=0.25", "trainer.max_steps=6", "trainer.eval_interval=6"]
    res = launch(central_run(tmp_path / "a", *common))
    assert res["mfu"] is None  # no known peak on a CPU
    assert res["model_flops"] == pytest.approx(res["flops_per_token"] * res["tokens_seen"])
    res = launch(central_run(tmp_path / "b", *common, "trainer.peak_tflops=0.001"))
    assert res["mfu"] == pytest.approx(res["model_flops"] / res["train_time_s"] / 1e9)
    dense = launch(central_run(tmp_path / "c", "experiment=gpt2_full", "trainer.max_steps=6"))
    assert dense["tokens_seen"] == res["tokens_seen"] and dense["model_flops"] > 2 * res["model_flops"]


def test_lazy_non_finite_check_reports_the_first_bad_step(tmp_path, monkeypatch):
    """The GPU path reads the flag only at log/eval/checkpoint steps; it must still name step 7 and
    never checkpoint the bad state (checkpoint at 8 is refused, step 4 stays the newest)."""
    real = Trainer.train_step

    def poisoned(self):
        loss = real(self)
        if self.step >= 7:
            return loss * float("nan")
        return loss

    monkeypatch.setattr(Trainer, "train_step", poisoned)
    monkeypatch.setattr(Trainer, "_lazy_checks", lambda self: True)
    checked = []
    real_raise = Trainer._raise_if_nonfinite
    monkeypatch.setattr(Trainer, "_raise_if_nonfinite", lambda self: (checked.append(self.step), real_raise(self)))
    with pytest.raises(FloatingPointError, match="step 7"):
        launch(central_run(tmp_path, "experiment=gpt2_fixed", "trainer.max_steps=12", "trainer.ckpt_interval=4",
                           "trainer.log_interval=5", "trainer.eval_interval=12"))
    assert checked == [4, 5, 8]  # not every step
    assert latest_complete(tmp_path / "checkpoints").name == f"step-{4:09d}"
