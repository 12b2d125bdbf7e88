"""Sampling: greedy and top-k decoding checked step by step against the model's own logits, dense and factorized;
``mode=sample`` from a run directory; TensorBoard samples during training leave the training itself unchanged."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedlowrank.central import launch
from fedlowrank.central.sample import generate
from fedlowrank.lowrank import factorize
from fedlowrank.models.gpt2 import GPT2, GPT2Config
from fedlowrank.models.llama import Llama, LlamaConfig

from helpers import central_run

ROOT = Path(__file__).resolve().parents[1]


def _models():
    torch.manual_seed(0)
    gpt = GPT2(GPT2Config.from_size("tiny", vocab_size=50, block_size=12))
    llama = Llama(LlamaConfig(vocab_size=50, block_size=12, n_layer=2, n_head=4, n_kv_head=2, dim=32, hidden_dim=64))
    low = Llama(LlamaConfig(vocab_size=50, block_size=12, n_layer=2, n_head=4, dim=32, hidden_dim=64))
    factorize(low, ratio=0.25, skip=["lm_head"])
    return {"gpt2": gpt, "llama-gqa": llama, "llama-factorized": low}


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "llama-factorized"])
def test_greedy_and_top_k_follow_the_models_logits(name):
    model = _models()[name].eval()
    idx = torch.randint(0, 50, (2, 5))
    out = generate(model, idx, 20, temperature=0)  # runs past block_size 12: the context is cropped
    assert out.shape == (2, 25) and torch.equal(out[:, :5], idx)
    with torch.no_grad():
        for t in range(5, 25):
            ctx = out[:, max(0, t - 12):t]
            assert torch.equal(out[:, t], model(ctx)[:, -1].argmax(-1))
    g = torch.Generator().manual_seed(1)
    top1 = generate(model, idx, 20, temperature=1.0, top_k=1, generator=g)
    assert torch.equal(top1, out)  # top-1 sampling is greedy
    sampled = generate(model, idx, 20, temperature=1.5, top_k=3, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for t in range(5, 25):
            top3 = model(sampled[:, max(0, t - 12):t])[:, -1].topk(3).indices
            assert (top3 == sampled[:, t:t + 1]).any(-1).all()
    again = generate(model, idx, 20, temperature=1.5, top_k=3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(again, sampled) and not torch.equal(sampled, out)
    assert model.training is False


def test_tensorboard_samples_leave_training_unchanged(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    common = ["experiment=llama_full", "trainer.max_steps=6", "trainer.eval_interval=3", "trainer.log_interval=1"]
    plain = launch(central_run(tmp_path / "a", *common))
    sampled = launch(central_run(tmp_path / "b", *common, "trainer.sample_every=3", "trainer.sample_tokens=8"))
    assert sampled["losses"] == plain["losses"] and sampled["final_eval"] == plain["final_eval"]
    acc = EventAccumulator(str(tmp_path / "b" / "tb"), size_guidance={"tensors": 0}).Reload()
    texts = acc.Tensors("samples/text/text_summary")
    assert [e.step for e in texts] == [3, 6]


def test_mode_sample_from_a_run_directory(tmp_path):
    launch(central_run(tmp_path / "run", "experiment=llama_full", "trainer.max_steps=2"))
    res = subprocess.run([sys.executable, "main.py", "mode=sample", f"ckpt={tmp_path / 'run'}",
                          "sample.prompt=Hello", "sample.max_new_tokens=12", "sample.num_samples=2",
                          f"out_dir={tmp_path / 's'}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("sample 0:") == 1 and "sample 1:" in res.stdout and "Hello" in res.stdout
    bad = subprocess.run([sys.executable, "main.py", "mode=sample", f"ckpt={tmp_path / 'nothing'}",
                          f"out_dir={tmp_path / 's2'}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "not a directory" in bad.stdout + bad.stderr


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "llama-factorized"])
def test_the_kv_cache_gives_the_recomputed_logits(name):
    model = _models()[name].eval()
    idx = torch.randint(0, 50, (2, 4))
    cache = [{} for _ in range(model.config.n_layer)]
    with torch.no_grad():
        steps = [model(idx, cache=cache)[:, -1]]
        seq = idx
        for t in range(6):
            nxt = torch.randint(0, 50, (2, 1))
            seq = torch.cat([seq, nxt], 1)
            steps.append(model(nxt, cache=cache)[:, -1])
            assert (steps[-1] - model(seq)[:, -1]).abs().max() <= 1e-5  # cached step == full recompute
        with pytest.raises(ValueError, match="block_size"):
            model(torch.zeros(2, 3, dtype=torch.long), cache=cache)  # 10 cached + 3 > block_size 12
    # generate: the cached path (fits in block_size) and the recompute path agree on greedy decoding
    cached = generate(model, idx, 8, temperature=0)
    assert torch.equal(cached, generate(model, idx, 8, temperature=0, top_k=1))
    with torch.no_grad():
        for t in range(4, 12):
            assert torch.equal(cached[:, t], model(cached[:, :t])[:, -1].argmax(-1))
