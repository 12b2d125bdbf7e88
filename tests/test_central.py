"""Central LM pretraining on CPU: DDP replicas, exact resume, InRank stages, optimizer state."""
import json

import numpy as np
import pytest
import torch

from fedlowrank.central import central_run_from_cfg, launch
from fedlowrank.config import ConfigError
from fedlowrank.lowrank import LowRankLinear, lowrank_modules
from fedlowrank.methods.inrank import InRank, InRankConfig
from fedlowrank.training.optim import remap_optimizer_state
from fedlowrank.training.schedulers import cosine_lr

from helpers import central_run as _run
from helpers import compose_cfg


def test_ddp_two_processes_keep_replicas_identical_through_rank_growth(tmp_path):
    run = _run(tmp_path, "experiment=gpt2_inrank", "trainer.devices=2", "trainer.device=cpu", "trainer.max_steps=16",
               "trainer.grad_accum=2", "method.init_rank=1", "method.buffer=2", "method.check_interval=4",
               "method.stage1_steps=12", "trainer.log_interval=4", "trainer.eval_interval=8")
    res = launch(run)
    assert res["step"] == 16 and res["stage"] == 2
    assert any(h["changes"] for h in res["inrank_history"])  # ranks grew while wrapped in DDP
    assert res["replica_max_diff"] == 0.0


@pytest.mark.parametrize("stop", [6, 13])  # mid stage 1 (grown ranks) and after compression
def test_resume_reproduces_loss_trajectory(tmp_path, stop):
    common = ["experiment=gpt2_inrank", "trainer.max_steps=18", "trainer.log_interval=1", "trainer.eval_interval=9",
              "method.init_rank=1", "method.buffer=2", "method.check_interval=3", "method.stage1_steps=10",
              "model.dropout=0.1"]
    full = launch(_run(tmp_path / "full", *common))
    part = _run(tmp_path / "part", *common, f"trainer.stop_after={stop}")
    first = launch(part)
    assert first["step"] == stop
    second = launch(_run(tmp_path / "part", *common, "trainer.resume=auto"))
    assert second["step"] == 18
    a = dict((s, l) for s, l in full["losses"])
    b = dict((s, l) for s, l in second["losses"])
    assert sorted(b) == list(range(1, 19))
    for s in range(1, 19):
        assert b[s] == pytest.approx(a[s], rel=1e-5, abs=1e-6), f"step {s}: {b[s]} vs {a[s]}"
    assert second["ranks"] == full["ranks"]
    assert second["inrank_history"] == full["inrank_history"]  # rank history survives the resume
    assert any(h["changes"] for h in full["inrank_history"])
    # throughput covers the whole run, both segments and both stages
    assert second["tokens_seen"] == full["tokens_seen"] == 18 * 4 * 32
    assert second["train_time_s"] > 0 and second["tokens_per_s"] == pytest.approx(
        second["tokens_seen"] / second["train_time_s"])


def test_fsdp2_two_processes_train_and_resume_exactly(tmp_path):
    common = ["experiment=gpt2_fixed", "model.ratio=0.25", "trainer.devices=2", "trainer.device=cpu", "trainer.dist=fsdp",
              "trainer.max_steps=12", "trainer.log_interval=1", "trainer.eval_interval=6"]
    full = launch(_run(tmp_path / "full", *common))
    launch(_run(tmp_path / "part", *common, "trainer.stop_after=7"))
    resumed = launch(_run(tmp_path / "part", *common, "trainer.resume=auto"))
    assert [s for s, _ in resumed["losses"]] == list(range(1, 13))
    for (s, a), (_, b) in zip(full["losses"], resumed["losses"]):
        assert b == pytest.approx(a, rel=1e-5), s
    assert full["losses"][-1][1] < full["losses"][0][1]


def test_inrank_grows_then_stage2_loads_compressed_checkpoint(tmp_path):
    s1 = launch(_run(tmp_path / "s1", "experiment=gpt2_inrank", "trainer.max_steps=30", "method.init_rank=1",
                     "method.buffer=2", "method.check_interval=5", "method.stage1_steps=30", "trainer.lr=1e-2",
                     "trainer.eval_interval=30"))
    grown = [h for h in s1["inrank_history"] if h["changes"]]
    assert grown, "no layer grew"
    assert max(v[1] for h in grown for v in h["changes"].values()) > 3  # above init_rank + buffer
    meta = json.loads((tmp_path / "s1" / "stage1" / "last" / "meta.json").read_text())  # stage1/step-<n>, last -> it
    assert meta["ranks"] == s1["ranks"] and meta["step"] == 30
    s2 = launch(_run(tmp_path / "s2", "experiment=gpt2_inrank", "trainer.max_steps=34", "method.stage=2",
                     f"method.stage1_ckpt={tmp_path / 's1' / 'stage1'}", "trainer.log_interval=1",
                     "trainer.eval_interval=34"))
    assert s2["ranks"] == meta["ranks"] and s2["losses"][0][0] == 31  # continued, fixed ranks
    fresh = launch(_run(tmp_path / "fresh", "experiment=gpt2_fixed", "model.ratio=0.1", "trainer.max_steps=1",
                        "trainer.log_interval=1", "trainer.eval_interval=1"))
    assert s2["losses"][0][1] < fresh["losses"][0][1] - 0.3  # starts from trained weights, not from scratch


def test_step_counter_counts_optimizer_steps_only(tmp_path):
    res = launch(_run(tmp_path, "experiment=gpt2_full", "trainer.max_steps=5", "trainer.grad_accum=3",
                      "trainer.log_interval=1", "trainer.eval_interval=2", "model=llama"))
    assert [s for s, _ in res["losses"]] == [1, 2, 3, 4, 5]
    assert [e["step"] for e in res["evals"]] == [2, 4, 5]


def test_optimizer_state_follows_rank_growth():
    layer = LowRankLinear(12, 10, rank=3)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    layer(torch.randn(4, 12)).square().sum().backward()
    opt.step()
    oldU, oldV = layer.U, layer.V
    mU = opt.state[oldU]["exp_avg"].clone()
    layer.grow(5)
    remap_optimizer_state(opt, {oldU: layer.U, oldV: layer.V})
    st = opt.state[layer.U]
    assert st["exp_avg"].shape == (10, 5) and torch.equal(st["exp_avg"][:, :3], mU)
    assert st["exp_avg"][:, 3:].abs().sum() == 0 and oldU not in opt.state
    assert any(p is layer.U for p in opt.param_groups[0]["params"])
    layer(torch.randn(4, 12)).square().sum().backward()
    opt.step()  # the optimizer works with the new shapes


def test_inrank_targets_follow_explained_ratio():
    torch.manual_seed(0)
    model = torch.nn.Sequential(LowRankLinear(32, 32, rank=8))
    layer = model[0]
    with torch.no_grad():  # spectrum 10, 5, 1, 0.1, ... → 90% energy at k = 2
        P, _ = torch.linalg.qr(torch.randn(32, 8))
        Q, _ = torch.linalg.qr(torch.randn(32, 8))
        S = torch.tensor([10.0, 5.0, 1.0, 0.1, 0.1, 0.1, 0.1, 0.1])
        layer.U.copy_(P * S.sqrt())
        layer.V.copy_((Q * S.sqrt()).T)
    ir = InRank(InRankConfig(threshold=0.9, init_rank=2, buffer=3, rule="energy"))
    assert ir.targets(model) == {"0": 5}
    assert ir.compressed_ranks(model) == {"0": 2}
    assert ir.update(model, step=25) == {}  # 5 < 8: nothing to grow
    layer.truncate(3)
    assert ir.update(model, step=50) == {"0": 5} and layer.rank == 5


def test_inrank_default_rule_is_the_papers_variance_ratio():
    """Default: 1 - var(tail)/var(s) over the spectrum padded to min(m, n), as the reference."""
    from fedlowrank.lowrank import explained_variance_rank

    torch.manual_seed(0)
    model = torch.nn.Sequential(LowRankLinear(16, 16, rank=12, init="random"))
    layer = model[0]
    with torch.no_grad():
        P, _ = torch.linalg.qr(torch.randn(16, 12))
        Q, _ = torch.linalg.qr(torch.randn(16, 12))
        S = torch.linspace(3.0, 0.5, 12)
        layer.U.copy_(P * S.sqrt())
        layer.V.copy_((Q * S.sqrt()).T)
    cfg = InRankConfig(buffer=4, init_rank=8)
    assert cfg.rule == "variance"
    k = explained_variance_rank(S, cfg.threshold, n_total=16)
    assert k == 9  # independent of the factor rank: the tail is padded to min(m, n) = 16
    # the window from the kept rank 8 is [8, min(8 + 4, 16 - 4)) = [8, 12): 9 is its first passing index
    assert InRank(cfg).targets(model) == {"0": k + 4}
    assert InRank(InRankConfig(buffer=4, init_rank=8, rule="energy")).targets(model) != {"0": k + 4}
    # from the kept rank 2 the window [2, 6) holds no passing index: its last, 5, is kept (the reference)
    assert InRank(InRankConfig(buffer=4)).targets(model) == {"0": 5 + 4}


def _set_spectrum(layer, S: torch.Tensor, seed: int) -> None:
    """Factors of ``layer`` (rank len(S)) whose product has singular values S."""
    g = torch.Generator().manual_seed(seed)
    m, n = layer.U.shape[0], layer.V.shape[1]
    P, _ = torch.linalg.qr(torch.randn(m, len(S), generator=g, dtype=torch.float64))
    Q, _ = torch.linalg.qr(torch.randn(n, len(S), generator=g, dtype=torch.float64))
    with torch.no_grad():
        layer.U.copy_((P * S.double().sqrt()).float())
        layer.V.copy_((Q * S.double().sqrt()).T.float())


def _reference_window(s: np.ndarray, k: int, buffer: int, max_modes: int, threshold: float) -> int:
    """InRank's reference rank search, written again from its description: from the current modes k, the
    first index of [k, min(k + buffer, max_modes - buffer)) whose ratio 1 - var(s - s_kept)/var(s) (torch's
    unbiased variance, s = every singular value of the dense product) exceeds the threshold, else the last."""
    if k >= max_modes - buffer:
        return k
    for index in range(k, min(k + buffer, max_modes - buffer)):
        kept = s.copy()
        kept[index:] = 0
        ratio = 1 - np.var(s - kept, ddof=1) / np.var(s, ddof=1)
        if ratio > threshold:
            break
    return index


def test_inrank_kept_rank_follows_the_reference_window_and_is_the_stage2_rank():
    """Over a sequence of spectra (slowly decaying, then concentrated), the kept rank after every check equals
    the reference's windowed search on the dense product's singular values (numpy), never decreases, and is
    what stage 2 keeps: not the explained rank recomputed at the end (3 here)."""
    from fedlowrank.lowrank import explained_variance_rank

    model = torch.nn.Sequential(LowRankLinear(64, 64, rank=4))
    layer = model[0]
    cfg = InRankConfig(init_rank=2, buffer=6, max_rank_ratio=0.5)  # the reference's max_modes = min(m, n) / 2
    ir = InRank(cfg)
    ir.prepare(model)
    assert layer.rank == 8 and ir.kept == {"0": 2}
    k_ref, kept = 2, []
    for step, decay in enumerate([0.97, 0.97, 0.97, 0.98, 0.2, 0.2], start=1):
        S = decay ** torch.arange(layer.rank, dtype=torch.float64) * 10
        _set_spectrum(layer, S, seed=step)
        dense = np.linalg.svd((layer.U @ layer.V).detach().double().numpy(), compute_uv=False)
        k_ref = _reference_window(dense, k_ref, cfg.buffer, 32, cfg.threshold)
        ir.update(model, step)
        kept.append(ir.kept["0"])
        assert ir.kept["0"] == k_ref and layer.rank == min(32, k_ref + cfg.buffer)
    assert kept == sorted(kept) and kept[-1] > kept[0]
    assert explained_variance_rank(layer.spectrum(), cfg.threshold, n_total=64) <= 3  # concentrated by now
    assert ir.compressed_ranks(model) == {"0": kept[-1]}
    ir.compress(model)
    assert layer.rank == kept[-1]


def test_inrank_kept_ranks_survive_resume(tmp_path):
    """The kept ranks are trainer state: a run stopped mid stage 1 and resumed keeps them, and ends at the same
    stage-2 ranks as an uninterrupted run."""
    args = ("experiment=gpt2_inrank", "trainer.max_steps=30", "method.init_rank=1", "method.buffer=2",
            "method.check_interval=5", "method.stage1_steps=30", "trainer.lr=1e-2", "trainer.eval_interval=30",
            "trainer.ckpt_interval=10")
    full = launch(_run(tmp_path / "full", *args))
    launch(_run(tmp_path / "part", *args, "trainer.stop_after=15"))
    meta = json.loads((tmp_path / "part" / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["step"] == 15 and set(meta["method_state"]["kept"]) == set(full["ranks"])
    resumed = launch(_run(tmp_path / "part", *args, "trainer.resume=auto"))
    assert resumed["ranks"] == full["ranks"]


def test_gpt2_inrank_experiments_factorize_the_mlp_only():
    """As the reference: GPT-2's MLP (c_fc, c_proj) is factorized, attention stays dense."""
    from fedlowrank.central.model import build_lm
    from fedlowrank.lowrank import lowrank_modules

    for exp in ("gpt2_inrank", "gpt2_small_inrank", "gpt2_medium_inrank", "gpt2_large_inrank"):
        run = central_run_from_cfg(compose_cfg("mode=central", f"experiment={exp}", "out_dir=x"))
        assert run.model.targets == [r"mlp\."], exp
    model = build_lm(_run("x", "experiment=gpt2_inrank"), vocab_size=64)
    names = sorted(lowrank_modules(model))
    assert names and all(".mlp." in n for n in names)
    assert {n.rsplit(".", 1)[1] for n in names} == {"c_fc", "c_proj"}


def test_central_config_errors():
    with pytest.raises(ConfigError, match="go together"):
        _run("x", "mode=central", "method=inrank")
    with pytest.raises(ConfigError, match="FSDP2"):
        _run("x", "experiment=gpt2_inrank", "trainer.dist=fsdp")
    with pytest.raises(ConfigError, match="model.ratio"):
        _run("x", "experiment=gpt2_fixed", "model.ratio=1.5")
    with pytest.raises(ConfigError, match="threshold"):
        _run("x", "experiment=gpt2_inrank", "method.threshold=0")
    cfg = compose_cfg("mode=central", "data=digits", "out_dir=x")  # gpt2 on images
    with pytest.raises(ConfigError, match="holds images: train a vision model"):
        central_run_from_cfg(cfg)
    cfg = compose_cfg("mode=central", "data=femnist", "out_dir=x")
    with pytest.raises(ConfigError, match="text corpus .* or an image dataset"):
        central_run_from_cfg(cfg)


def test_cosine_schedule():
    assert cosine_lr(0, 100, 1.0, warmup_steps=10) == pytest.approx(0.1)
    assert cosine_lr(10, 100, 1.0, warmup_steps=10, min_lr_ratio=0.1) == pytest.approx(1.0)
    assert cosine_lr(100, 100, 1.0, warmup_steps=10, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert cosine_lr(55, 100, 1.0, warmup_steps=10, min_lr_ratio=0.0) == pytest.approx(0.5)


def test_lowrank_modules_in_gpt2_and_llama_targets(tmp_path):
    from fedlowrank.central.model import build_lm

    for exp in ("gpt2_fixed", "llama_inrank"):
        run = _run(tmp_path, f"experiment={exp}")
        names = list(lowrank_modules(build_lm(run, 256)))
        assert names and all(("attn" in n or "mlp" in n) for n in names)
