"""ReLoRA and WeLore: merge invariance, pruning, schedule, reduction targets, trainer integration."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from fedlowrank.central import central_run_from_cfg, launch
from fedlowrank.config import ConfigError
from fedlowrank.lowrank import LowRankLinear, add_lora, lora_modules
from fedlowrank.methods.relora import ReLoRA, ReLoRAConfig, prune_tensor_
from fedlowrank.methods.welore import (
    WeLoreConfig, normalized_spectra, plan_at_threshold, plan_welore, target_linears, welore_compress,
)
from fedlowrank.models.gpt2 import GPT2, GPT2Config
from fedlowrank.models.llama import Llama, LlamaConfig
from fedlowrank.training.schedulers import cosine_lr, jagged_cosine_lr

from helpers import central_run as _run
from helpers import compose_cfg


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
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {f"{n}.base.weight" for n in names}  # reference: only wrapped weights freeze
    assert {"wte.weight", "h.0.ln_1.weight", "h.0.attn.c_attn.base.bias"} <= trainable
    only = GPT2(GPT2Config.from_size("tiny", vocab_size=64, block_size=16))
    ReLoRA(ReLoRAConfig(r=4, train_base=False)).wrap(only)
    assert all(".adapter." in n for n, p in only.named_parameters() if p.requires_grad)


def test_lora_forward_is_base_plus_alpha_over_r_and_init_is_kaiming_uniform():
    torch.manual_seed(0)
    base = nn.Linear(48, 20)
    model = nn.Sequential(base)
    add_lora(model, r=4, alpha=8.0, targets=["0"])
    lm = model[0]
    A = lm.adapter.V.detach()
    bound = 1.0 / 48 ** 0.5  # nn.Linear's kaiming_uniform_(a=sqrt(5)) bound
    assert A.abs().max() <= bound and abs(A.std().item() - bound / 3 ** 0.5) < 0.1 * bound
    with torch.no_grad():
        lm.adapter.U.normal_()  # B != 0
    x = torch.randn(5, 48, dtype=torch.float64)
    W, b = lm.base.weight.double(), lm.base.bias.double()
    Bm, Am = lm.adapter.U.double(), lm.adapter.V.double()
    expect = x @ W.T + b + (8.0 / 4) * (x @ Am.T @ Bm.T)  # s = alpha / r
    assert torch.allclose(lm.double()(x), expect, atol=1e-10)
    assert torch.allclose(lm.delta().double(), 2.0 * Bm @ Am, atol=1e-5)


def test_trainable_scaling_is_tanh_and_survives_restarts():
    model = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3))
    rl = ReLoRA(ReLoRAConfig(r=2, targets=["0", "2"], skip=[], trainable_scaling=True, reset_every=5,
                             restart_warmup_steps=1))
    rl.wrap(model)
    lm = model[0]
    assert lm.scale_param.requires_grad and lm.scale().item() == pytest.approx(torch.tanh(torch.tensor(1.0)).item())
    with torch.no_grad():
        lm.adapter.U.normal_()
        lm.scale_param.fill_(0.3)
    x = torch.randn(4, 12)
    y = model(x)
    rl.restart(model, None, step=5)
    assert torch.allclose(model(x), y, atol=1e-5)  # merged with tanh(0.3)
    assert lm.scale_param.item() == 1.0  # reset to its start, not 0 (which would freeze the adapter)
    model(x).square().sum().backward()
    assert lm.adapter.U.grad.abs().sum() > 0  # the fresh adapter learns


@pytest.mark.parametrize("mode", ["magnitude", "random"])
def test_pruning_zeroes_the_stated_fraction(mode):
    t = torch.randn(40, 25) + 0.01 * torch.sign(torch.randn(40, 25))
    kept_before = t.clone()
    k = prune_tensor_(t, 0.9, mode, torch.Generator().manual_seed(0))
    assert k == 900 and int((t == 0).sum()) == 900
    if mode == "magnitude":  # the survivors are exactly the largest |values|
        top = torch.topk(kept_before.abs().flatten(), 100).values
        assert torch.allclose(t[t != 0].abs().sort().values, top.sort().values)


@pytest.mark.parametrize("mode", ["magnitude", "random"])
def test_restart_prunes_the_fraction_of_both_moments_together(mode):
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    rl = ReLoRA(ReLoRAConfig(r=4, targets=["0", "2"], skip=[], prune_ratio=0.9, prune=mode, reset_every=5,
                             restart_warmup_steps=2))
    rl.wrap(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(torch.randn(8, 20)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    before = {id(p): opt.state[p]["exp_avg"].clone() for p in ReLoRA.adapter_params(model)}
    base_state = opt.state[model[0].base.bias]["exp_avg"].clone()
    rl.restart(model, opt, step=5)
    for p in ReLoRA.adapter_params(model):
        m, v = opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]
        assert int((m == 0).sum()) == round(0.9 * m.numel())  # the fraction, not everything
        assert torch.equal(m == 0, v == 0)  # an entry loses both moments or neither
        if mode == "magnitude":  # survivors: the largest |exp_avg|
            top = torch.topk(before[id(p)].abs().flatten(), m.numel() - round(0.9 * m.numel())).values
            assert torch.allclose(m[m != 0].abs().sort().values, top.sort().values)
    assert torch.equal(opt.state[model[0].base.bias]["exp_avg"], base_state)  # non-adapter state untouched


def test_jagged_schedule_matches_the_reference_lambda():
    kw = dict(max_steps=400, lr=1.0, warmup_steps=20, min_lr_ratio=0.1)
    for step in (100, 200, 300):  # restarts every 100 steps, ramp over 10 steps
        top = cosine_lr(step + 10, **kw)  # the reference ramps to the cosine at the ramp's end
        for j in range(10):
            assert jagged_cosine_lr(step + j, restart_every=100, restart_warmup_steps=10, **kw) == pytest.approx(
                top * (j + 1) / 11)
        assert jagged_cosine_lr(step + 10, restart_every=100, restart_warmup_steps=10, **kw) == pytest.approx(top)
    for step in (0, 5, 19, 50, 99):  # first warm-up and first cycle: plain cosine
        assert jagged_cosine_lr(step, restart_every=100, restart_warmup_steps=10, **kw) == cosine_lr(step, **kw)


def test_schedule_fractions_resolve_against_max_steps_and_explicit_steps_win():
    c = ReLoRAConfig(warm_start_fraction=1 / 3, reset_fraction=1 / 6).for_steps(300)
    assert (c.warm_start_steps, c.reset_every, c.warm_start_fraction, c.reset_fraction) == (100, 50, None, None)
    assert ReLoRAConfig(warm_start_fraction=1 / 3, reset_fraction=1 / 6).for_steps(1500).reset_every == 250
    assert ReLoRAConfig(reset_fraction=0.001, restart_warmup_steps=0).for_steps(100).reset_every == 1  # >= 1 step
    c = ReLoRAConfig(warm_start_steps=7, warm_start_fraction=0.5, reset_every=20, reset_fraction=0.5).for_steps(100)
    assert (c.warm_start_steps, c.reset_every) == (7, 20)  # a step count that is set wins over its fraction
    c = ReLoRAConfig().for_steps(None)
    assert (c.warm_start_steps, c.reset_every) == (0, 50)
    with pytest.raises(ValueError, match="fractions of trainer.max_steps"):
        ReLoRAConfig(reset_fraction=0.2).for_steps(None)  # federated mode has no max_steps
    for bad in ({"warm_start_fraction": 1.0}, {"reset_fraction": 0.0}, {"ratio": 1.5}, {"r": 0}):
        with pytest.raises(ValueError):
            ReLoRAConfig(**bad).for_steps(100)
    with pytest.raises(ValueError, match="restart_warmup_steps must be smaller"):  # checked after resolution
        ReLoRAConfig(reset_fraction=0.05, restart_warmup_steps=10).for_steps(100)


def test_bad_fraction_is_a_config_error_before_training(tmp_path):
    with pytest.raises(ConfigError, match="method.reset_fraction"):
        _run(tmp_path, "experiment=llama_relora", "method.reset_fraction=1.5")


def test_adapter_rank_r_wins_over_ratio_and_ratio_follows_each_matrix():
    def ranks(**kw):
        torch.manual_seed(0)
        model = Llama(LlamaConfig.from_size("tiny", vocab_size=64, block_size=16))
        ReLoRA(ReLoRAConfig(**kw)).wrap(model)
        return {n: (m.adapter.rank, min(m.base.weight.shape)) for n, m in lora_modules(model).items()}

    got = ranks(ratio=0.25)
    assert {full for _, full in got.values()} == {64}  # tiny LLaMA: d = 64, MLP 64 x 172
    assert all(r == -(-full // 4) for r, full in got.values())
    assert {r for r, _ in ranks(ratio=0.25, r=2).values()} == {2}
    assert {r for r, _ in ranks().values()} == {8}  # neither set: the historical default


def test_no_restart_after_the_last_step():
    rl = ReLoRA(ReLoRAConfig(warm_start_steps=10, reset_every=10, restart_warmup_steps=2), max_steps=40)
    assert [s for s in range(1, 41) if rl.is_restart(s, 40)] == [20, 30]
    assert rl.is_restart(40) and not rl.is_restart(40, 40)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_default_experiment_holds_within_ten_percent_of_full_rank(tmp_path):
    """The issue's bar for the default ``experiment=llama_relora``: held-out perplexity within 1.10x of the
    full-rank run of the same config (300 steps, tiny LLaMA, pydoc text), trained and evaluated here."""
    common = ["trainer.progress=false", "trainer.device=cpu", "trainer.eval_full=true", "trainer.eval_interval=300"]
    runs = {}
    for exp in ("llama_full", "llama_relora"):
        cfg = compose_cfg(f"experiment={exp}", *common, f"out_dir={tmp_path / exp}")
        runs[exp] = launch(central_run_from_cfg(cfg))
    assert runs["llama_relora"]["relora_restarts"] == 3  # warm start 100, merges after 150, 200, 250
    ratio = runs["llama_relora"]["final_eval"]["ppl"] / runs["llama_full"]["final_eval"]["ppl"]
    assert ratio <= 1.10, ratio


def test_after_warm_start_a_new_cycle_with_its_own_lr_and_warmup():
    rl = ReLoRA(ReLoRAConfig(warm_start_steps=30, reset_every=50, restart_warmup_steps=5, lr=2.0, warmup_steps=10))
    for s in (0, 10, 29):  # warm start: the full-rank run's own schedule
        assert rl.lr(s, 400, 1.0, 20, 0.1) == cosine_lr(s, 400, 1.0, 20, 0.1)
    for j in range(10):  # new warm-up from the switch, to the new peak
        assert rl.lr(30 + j, 400, 1.0, 20, 0.1) == pytest.approx(2.0 * (j + 1) / 10)
    assert rl.lr(40, 400, 1.0, 20, 0.1) == pytest.approx(2.0)
    # then one cosine over the remaining 370 steps, restarts at 30 + 50k
    assert rl.lr(200, 400, 1.0, 20, 0.1) == pytest.approx(jagged_cosine_lr(170, 370, 2.0, 10, 50, 5, 0.1))
    assert rl.lr(80, 400, 1.0, 20, 0.1) < rl.lr(79, 400, 1.0, 20, 0.1) / 3  # ramp after the restart
    assert rl.is_restart(80) and rl.is_restart(130) and not rl.is_restart(30) and not rl.is_restart(100)


def test_adapters_get_their_own_adam_settings(tmp_path):
    from fedlowrank.central.trainer import Trainer
    from fedlowrank.data.text import load_text_data

    run = _run(tmp_path, "experiment=llama_relora", "method.warm_start_steps=0", "method.adapter_beta2=0.999",
               "method.adapter_weight_decay=0.0", "trainer.weight_decay=0.1", "trainer.beta2=0.95")
    from fedlowrank.central.dist import init_dist

    tr = Trainer(run, init_dist(None, "cpu"), load_text_data("pydoc", max_chars=20000))
    adapters = {id(p) for p in ReLoRA.adapter_params(tr.model)}
    groups = [g for g in tr.opt.param_groups if any(id(p) in adapters for p in g["params"])]
    assert groups and all(g["betas"] == (0.9, 0.999) and g["weight_decay"] == 0.0 for g in groups)
    assert all(id(p) in adapters for g in groups for p in g["params"])
    others = [g for g in tr.opt.param_groups if g not in groups]
    assert others and all(g["betas"] == (0.9, 0.95) for g in others)
    assert any(g["weight_decay"] == 0.1 for g in others)


def test_a_restart_never_makes_the_eval_loss_jump(tmp_path):
    res = launch(_run(tmp_path, "experiment=llama_relora", "trainer.max_steps=50", "method.warm_start_steps=20",
                      "method.reset_every=10", "method.restart_warmup_steps=3", "trainer.eval_interval=1",
                      "trainer.eval_iters=4", "trainer.log_interval=1", "trainer.lr=3e-3", "method.prune=magnitude",
                      "method.prune_ratio=0.9", "method.train_base=false"))
    ev = {e["step"]: e["loss"] for e in res["evals"]}
    assert res["relora_restarts"] == 2  # after 30 and 40; none after the last step (50)
    for restart in (30, 40):
        after = [ev[s] for s in range(restart + 1, min(restart + 6, 51))]
        assert max(after, default=ev[restart]) <= ev[restart] + 0.02, (restart, ev[restart], after)


def test_relora_trains_adapters_and_base_and_resumes_exactly(tmp_path):
    common = ["experiment=llama_relora", "trainer.max_steps=16", "method.warm_start_steps=4", "method.reset_every=4",
              "method.restart_warmup_steps=1", "trainer.log_interval=1", "trainer.eval_interval=8", "method.r=2"]
    full = launch(_run(tmp_path / "full", *common))
    assert full["relora_restarts"] == 2  # after steps 8 and 12, not 16 (the last); 4 is the switch to adapters
    skel = _lora_skeleton()
    n_adapter = sum(m.adapter.U.numel() + m.adapter.V.numel() for m in lora_modules(skel).values())
    n_frozen = sum(m.base.weight.numel() for m in lora_modules(skel).values())
    assert full["trainable_params"] == full["params"] - n_frozen  # reference: all but the wrapped weights
    only = launch(_run(tmp_path / "only", *common, "method.train_base=false", "trainer.max_steps=5"))
    assert only["trainable_params"] == n_adapter
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
              "trainer.eval_interval=7", "method.target_reduction=0.4", "method.refine=true"]
    full = launch(_run(tmp_path / "full", *common))
    w = full["welore"]
    assert abs(w["plan"]["reduction"] - 0.4) < 0.01 and w["params_after"] < w["params_before"]
    assert w["plan"]["refined"] and json.loads((tmp_path / "full" / "welore_plan.json").read_text()) == w["plan"]
    assert full["trainable_params"] == w["trainable_params"] < full["params"]
    launch(_run(tmp_path / "part", *common, "trainer.stop_after=9"))
    res = launch(_run(tmp_path / "part", *common, "trainer.resume=auto"))
    for (s, a), (_, b) in zip(full["losses"], res["losses"]):
        assert b == pytest.approx(a, rel=1e-5), s
    with pytest.raises(ConfigError, match="FSDP2"):
        _run(tmp_path, "experiment=llama_welore", "trainer.dist=fsdp")
    with pytest.raises(ConfigError, match="dense model"):
        _run(tmp_path, "experiment=llama_welore", "model.lowrank=fixed", "model.ratio=0.5")


def _reference_welore_ranks(model, tau: float, min_ratio: float, targets, skip) -> dict[str, int | None]:
    """VITA-Group/WeLore's rule, written independently in numpy: min-max normalised spectrum,
    prune the values below τ, LRC iff pruned / rank > min_ratio (None: stays dense)."""
    out = {}
    for name, lin in target_linears(model, targets, skip).items():
        data = np.linalg.svd(lin.weight.detach().double().numpy(), compute_uv=False)
        norm = (data - data.min()) / (data.max() - data.min())
        pruned = int((norm < tau).sum())
        rank = min(lin.weight.shape)
        out[name] = rank - pruned if pruned / rank > min_ratio else None
    return out


def test_welore_ranks_at_a_threshold_match_the_reference_rule():
    torch.manual_seed(0)
    tg, sk = [r"attn\.", r"mlp\."], ["lm_head"]
    model = Llama(LlamaConfig.from_size("mini", vocab_size=256, block_size=32))
    _heavy_tailed(model, tg, sk, seed=5)
    sp, mixed = normalized_spectra(model, tg, sk), 0
    for tau in (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.178, 0.3):
        ref = _reference_welore_ranks(model, tau, 0.4999, tg, sk)
        plan = plan_at_threshold(sp, tau, "rank", 0.4999, "rank")
        assert plan.ranks == {n: k for n, k in ref.items() if k is not None}, tau
        assert set(plan.dense) == {n for n, k in ref.items() if k is None}, tau
        mixed += bool(plan.ranks and plan.dense)
    assert mixed  # some τ splits the matrices into LRCs and N-LRCs
    # defaults are the reference convention: min-max spectra (σ_min ≫ 0 for a random matrix)
    cfg, raw = WeLoreConfig(), Llama(LlamaConfig.from_size("mini", vocab_size=256, block_size=32))
    name, lin = next((n, m) for n, m in target_linears(raw, tg, sk).items() if m.in_features != m.out_features)
    s_ = np.linalg.svd(lin.weight.detach().double().numpy(), compute_uv=False)
    got = normalized_spectra(raw, tg, sk, cfg.normalize)[name][0]
    assert np.allclose(got, (s_ - s_.min()) / (s_.max() - s_.min()), atol=1e-6) and s_.min() > 0.1 * s_.max()
    assert (cfg.lrc_rule, cfg.min_ratio, cfg.train_norms) == ("rank", 0.4999, True)


def test_welore_solver_lands_on_reference_ranks_and_refines():
    """The solved τ's plan is the reference plan at that τ, corrected per rank to hit the target."""
    torch.manual_seed(2)
    tg, sk = [r"attn\.", r"mlp\."], ["lm_head"]
    model = Llama(LlamaConfig.from_size("mini", vocab_size=256, block_size=32))
    _heavy_tailed(model, tg, sk, seed=7)
    sp = normalized_spectra(model, tg, sk)
    plan = plan_welore(sp, 0.5, "params", 0.4999, "rank", refine=True)
    at_tau = plan_at_threshold(sp, plan.threshold, "params", 0.4999, "rank")
    assert abs(plan.reduction - 0.5) < 0.01 and plan.refined
    assert abs(at_tau.reduction - 0.5) > abs(plan.reduction - 0.5)  # τ alone misses; refinement hits
    diff = {n for n in plan.ranks if plan.ranks[n] != at_tau.ranks.get(n)}
    assert diff and all(abs(plan.ranks[n] - at_tau.ranks[n]) <= 64 for n in diff if n in at_tau.ranks)


def test_welore_default_plan_is_one_global_threshold_as_the_reference():
    """refine off (the default): every matrix keeps exactly its values >= the solved τ, i.e. the plan is the
    reference's plan at that single τ (which the test above checks against a numpy re-implementation);
    the solved τ is the lowest reaching the target, and the parameter reduction is reported beside the
    rank reduction of kind=rank."""
    torch.manual_seed(2)
    tg, sk = [r"attn\.", r"mlp\."], ["lm_head"]
    model = Llama(LlamaConfig.from_size("mini", vocab_size=256, block_size=32))
    _heavy_tailed(model, tg, sk, seed=7)
    sp = normalized_spectra(model, tg, sk)
    assert WeLoreConfig().refine is False
    for kind in ("params", "rank"):
        plan = plan_welore(sp, 0.5, kind, 0.4999, "rank")
        at_tau = plan_at_threshold(sp, plan.threshold, kind, 0.4999, "rank")
        assert not plan.refined and plan.ranks == at_tau.ranks and plan.dense == at_tau.dense
        assert plan.reduction >= 0.5 - 1e-9 and plan.reduction == pytest.approx(at_tau.reduction)
        lower = max(v for n in sp for v in sp[n][0] if v < plan.threshold)  # the next lower observed value
        assert plan_at_threshold(sp, lower, kind, 0.4999, "rank").reduction < 0.5
        assert plan.params_reduction == pytest.approx(plan_at_threshold(sp, plan.threshold, "params", 0.4999,
                                                                        "rank").reduction)
    assert plan.kind == "rank" and plan.params_reduction < plan.reduction  # attempted rank > achieved params


def test_welore_warns_with_the_achieved_value_when_the_target_is_missed(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16))
    _heavy_tailed(model, None, [])
    with caplog.at_level("WARNING", logger="fedlowrank.methods.welore"):
        plan = welore_compress(model, WeLoreConfig(target_reduction=0.1, targets=[], skip=[]))
    assert abs(plan.reduction - 0.1) > 0.01
    assert f"achieved {plan.reduction:.4f}" in caplog.text and "0.1000" in caplog.text


def test_welore_norms_train_with_the_lrcs_by_default():
    torch.manual_seed(0)
    tg, sk = [r"attn\.", r"mlp\."], ["lm_head"]
    model = Llama(LlamaConfig.from_size("tiny", vocab_size=64, block_size=16))
    _heavy_tailed(model, tg, sk)
    plan = welore_compress(model, WeLoreConfig(target_reduction=0.5, targets=tg, skip=sk))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    norms = {n for n, _ in model.named_parameters() if "norm" in n}
    lrc = {f"{n}.{f}" for n in plan.ranks for f in ("U", "V")}
    assert norms and trainable == lrc | norms  # embeddings, head and N-LRCs stay frozen
    frozen = Llama(LlamaConfig.from_size("tiny", vocab_size=64, block_size=16))
    _heavy_tailed(frozen, tg, sk)
    plan = welore_compress(frozen, WeLoreConfig(target_reduction=0.5, targets=tg, skip=sk, train_norms=False))
    assert {n for n, p in frozen.named_parameters() if p.requires_grad} == {f"{n}.{f}" for n in plan.ranks
                                                                             for f in ("U", "V")}
