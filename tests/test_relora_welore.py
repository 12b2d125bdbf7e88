"""ReLoRA and WeLore: merge invariance, pruning, schedule, reduction targets, trainer integration."""

import pytest
import torch
from torch import nn

from fedlowrank.central import launch
from fedlowrank.config import ConfigError
from fedlowrank.lowrank import LowRankLinear, add_lora, lora_modules
from fedlowrank.methods.relora import ReLoRA, ReLoRAConfig, prune_tensor_
from fedlowrank.methods.welore import (
    WeLoreConfig, normalized_spectra, plan_welore, target_linears, welore_compress,
)
from fedlowrank.models.gpt2 import GPT2, GPT2Config
from fedlowrank.models.llama import Llama, LlamaConfig
from fedlowrank.training.schedulers import cosine_lr, jagged_cosine_lr

from helpers import central_run as _run


# ----------------------------------------------------------------------------- ReLoRA
def test_merge_and_reinit_keep_the_function():
    torch.manual_seed(0)
    model = GPT2(GPT2Config.from_size("tiny", vocab_size=64, block_size=16))
    idx = torch.randint(0, 64, (2, 16))
    y0 = model(idx)
    rl = ReLoRA(ReLoRAConfig(r=4, alpha=8))
    names = rl.wrap(model)
    assert len(names) == 8
    assert torch.allclose(model(idx), y0, atol=1e-6)  # B = 0 at wrap time
    for m in lora_modules(model).values():
        assert m.adapter.V.abs().min() > 0 and m.adapter.U.abs().max() == 0  # A never zero, B zero
        m.adapter.U.data.normal_(std=0.1)  # pretend training moved B
    y1 = model(idx)
    assert not torch.allclose(y1, y0, atol=1e-4)
    A_before = {n: m.adapter.V.detach().clone() for n, m in lora_modules(model).items()}
    rl.restart(model, None, step=50)
    assert torch.allclose(model(idx), y1, atol=1e-5)  # merged: same function
    for n, m in lora_modules(model).items():
        assert m.adapter.U.abs().max() == 0 and m.adapter.V.abs().min() > 0
        assert not torch.equal(m.adapter.V, A_before[n])  # fresh A
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".adapter." in n for n in trainable)


@pytest.mark.parametrize("mode", ["magnitude", "random"])
def test_pruning_zeroes_the_stated_fraction(mode):
    t = torch.randn(40, 25) + 0.01 * torch.sign(torch.randn(40, 25))
    kept_before = t.clone()
    k = prune_tensor_(t, 0.9, mode, torch.Generator().manual_seed(0))
    assert k == 900 and int((t == 0).sum()) == 900
    if mode == "magnitude":  # the survivors are exactly the largest |values|
        top = torch.topk(kept_before.abs().flatten(), 100).values
        assert torch.allclose(t[t != 0].abs().sort().values, top.sort().values)


def test_restart_prunes_adapter_optimizer_state():
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    rl = ReLoRA(ReLoRAConfig(r=4, targets=["0", "2"], skip=[], prune_ratio=0.9, reset_every=5,
                             restart_warmup_steps=2))
    rl.wrap(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(torch.randn(8, 20)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    rl.restart(model, opt, step=5)
    for p in opt.param_groups[0]["params"]:
        for key in ("exp_avg", "exp_avg_sq"):
            v = opt.state[p][key]
            assert int((v == 0).sum()) >= round(0.9 * v.numel())
            assert int((v != 0).sum()) <= v.numel() - round(0.9 * v.numel())


def test_jagged_schedule_matches_formula_at_restarts():
    kw = dict(max_steps=400, lr=1.0, warmup_steps=20, min_lr_ratio=0.1)
    for step in (100, 200, 300):  # restarts every 100 steps, ramp over 10
        assert jagged_cosine_lr(step, restart_every=100, restart_warmup_steps=10, **kw) == 0.0
        for j in (1, 5, 9):
            assert jagged_cosine_lr(step + j, restart_every=100, restart_warmup_steps=10, **kw) == pytest.approx(
                cosine_lr(step + j, **kw) * j / 10)
        assert jagged_cosine_lr(step + 10, restart_every=100, restart_warmup_steps=10, **kw) == pytest.approx(
            cosine_lr(step + 10, **kw))
    assert jagged_cosine_lr(50, restart_every=100, restart_warmup_steps=10, **kw) == pytest.approx(cosine_lr(50, **kw))
    rl = ReLoRA(ReLoRAConfig(warm_start_steps=30, reset_every=50, restart_warmup_steps=5))
    assert rl.lr(30, 400, 1.0, 20, 0.1) == 0.0 and rl.lr(80, 400, 1.0, 20, 0.1) == 0.0  # switch + restarts
    assert rl.lr(82, 400, 1.0, 20, 0.1) == pytest.approx(cosine_lr(82, 400, 1.0, 20, 0.1) * 2 / 5)
    assert rl.is_restart(80) and rl.is_restart(130) and not rl.is_restart(30) and not rl.is_restart(100)


def test_relora_trains_only_adapters_and_resumes_exactly(tmp_path):
    common = ["experiment=llama_relora", "trainer.max_steps=16", "method.warm_start_steps=4", "method.reset_every=4",
              "method.restart_warmup_steps=1", "trainer.log_interval=1", "trainer.eval_interval=8", "method.r=2"]
    full = launch(_run(tmp_path / "full", *common))
    assert full["relora_restarts"] == 3  # after steps 8, 12 and 16 (4 is the switch to adapters)
    n_adapter = sum(m.adapter.U.numel() + m.adapter.V.numel() for m in lora_modules(
        _lora_skeleton()).values())
    assert full["trainable_params"] == n_adapter
    launch(_run(tmp_path / "part", *common, "trainer.stop_after=10"))
    res = launch(_run(tmp_path / "part", *common, "trainer.resume=auto"))
    for (s, a), (_, b) in zip(full["losses"], res["losses"]):
        assert b == pytest.approx(a, rel=1e-5), s


def _lora_skeleton():
    m = Llama(LlamaConfig.from_size("tiny", vocab_size=256, block_size=32))
    add_lora(m, r=2, targets=[r"attn\.", r"mlp\."], skip=["lm_head"])
    return m


def test_relora_ddp_keeps_replicas_identical(tmp_path):
    res = launch(_run(tmp_path, "experiment=llama_relora", "trainer.devices=2", "trainer.device=cpu", "trainer.max_steps=12",
                      "method.warm_start_steps=3", "method.reset_every=3", "method.restart_warmup_steps=1",
                      "trainer.eval_interval=12"))
    assert res["relora_restarts"] >= 2 and res["replica_max_diff"] == 0.0


def test_relora_fsdp2_runs_and_learns(tmp_path):
    res = launch(_run(tmp_path, "experiment=llama_relora", "trainer.devices=2", "trainer.device=cpu", "trainer.dist=fsdp",
                      "trainer.max_steps=16", "method.warm_start_steps=0", "method.reset_every=5",
                      "method.restart_warmup_steps=1", "trainer.log_interval=1", "trainer.eval_interval=16",
                      "trainer.lr=1e-2", "method.r=4"))
    assert res["relora_restarts"] == 3
    assert res["losses"][-1][1] < res["losses"][0][1]
    with pytest.raises(ConfigError, match="warm start"):
        _run(tmp_path, "experiment=llama_relora", "trainer.dist=fsdp")


# ----------------------------------------------------------------------------- WeLore
def _heavy_tailed(model, targets, skip, seed=0):
    """Give every target matrix a decaying spectrum, as trained weights have."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, lin in enumerate(target_linears(model, targets, skip).values()):
            U, S, Vh = torch.linalg.svd(lin.weight, full_matrices=False)
            decay = 2.0 + 10.0 * torch.rand(1, generator=g).item()
            lin.weight.copy_(U @ torch.diag(S * torch.exp(-torch.arange(len(S)) / decay)) @ Vh)


@pytest.mark.parametrize("kind", ["params", "rank"])
@pytest.mark.parametrize("target", [0.2, 0.5, 0.7])
def test_welore_hits_requested_reduction_within_one_percent(kind, target):
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_size("mini", vocab_size=256, block_size=32))
    tg, sk = [r"attn\.", r"mlp\."], ["lm_head"]
    _heavy_tailed(model, tg, sk)
    before = {n: (m.in_features, m.out_features) for n, m in target_linears(model, tg, sk).items()}
    plan = welore_compress(model, WeLoreConfig(target_reduction=target, kind=kind, min_ratio=0.4, targets=tg, skip=sk))
    # measure what was actually built, not what the plan says
    dense_size = sum(i * o if kind == "params" else min(i, o) for i, o in before.values())
    after = 0
    for n, (i, o) in before.items():
        m = model.get_submodule(n)
        if isinstance(m, LowRankLinear):
            after += m.rank * (i + o) if kind == "params" else m.rank
        else:
            after += i * o if kind == "params" else min(i, o)
    assert abs((1 - after / dense_size) - target) < 0.01
    assert plan.ranks and len(set(plan.ranks.values())) > 1  # non-uniform ranks


def test_welore_on_any_model_close_output_at_low_reduction_and_lrc_only_training():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 10))
    _heavy_tailed(model, None, [])
    x = torch.randn(32, 64)
    y0 = model(x).detach()
    plan = welore_compress(model, WeLoreConfig(target_reduction=0.1, targets=[], skip=["4"], min_ratio=0.3))
    y1 = model(x)
    assert ((y1 - y0).norm() / y0.norm()).item() < 0.05
    lrc = set(plan.ranks)
    assert lrc and all(isinstance(model.get_submodule(n), LowRankLinear) for n in lrc)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{f}" for n in lrc for f in ("U", "V")}


def test_plan_threshold_is_solved_not_tabled():
    torch.manual_seed(1)
    model = GPT2(GPT2Config.from_size("mini", vocab_size=64, block_size=16))
    _heavy_tailed(model, [r"attn\.", r"mlp\."], ["lm_head"], seed=3)
    sp = normalized_spectra(model, [r"attn\.", r"mlp\."], ["lm_head"])
    taus = [plan_welore(sp, t, "params", 0.4).threshold for t in (0.3, 0.5, 0.7)]
    assert taus[0] <= taus[1] <= taus[2]  # more reduction needs a higher threshold


def test_welore_central_pretrain_compress_finetune_and_resume(tmp_path):
    common = ["experiment=llama_welore", "trainer.max_steps=14", "method.pretrain_steps=6", "trainer.log_interval=1",
              "trainer.eval_interval=7", "method.target_reduction=0.4"]
    full = launch(_run(tmp_path / "full", *common))
    w = full["welore"]
    assert abs(w["plan"]["reduction"] - 0.4) < 0.01 and w["params_after"] < w["params_before"]
    assert full["trainable_params"] == w["trainable_params"] < full["params"]
    launch(_run(tmp_path / "part", *common, "trainer.stop_after=9"))
    res = launch(_run(tmp_path / "part", *common, "trainer.resume=auto"))
    for (s, a), (_, b) in zip(full["losses"], res["losses"]):
        assert b == pytest.approx(a, rel=1e-5), s
    with pytest.raises(ConfigError, match="FSDP2"):
        _run(tmp_path, "experiment=llama_welore", "trainer.dist=fsdp")
    with pytest.raises(ConfigError, match="dense model"):
        _run(tmp_path, "experiment=llama_welore", "model.lowrank=fixed", "model.ratio=0.5")
