"""Hugging Face checkpoints in and out, checked against ``transformers`` itself: tiny random GPT-2 and LLaMA
(one with grouped-query attention) saved by ``save_pretrained`` load here with the same logits; exports load in
``AutoModelForCausalLM`` with the same logits; pickle-only and unrepresentable checkpoints are refused."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedlowrank.central import launch
from fedlowrank.config import ConfigError
from fedlowrank.export import export
from fedlowrank.models.hf import PretrainedError, llama_config, load_pretrained, resolve

from helpers import central_run as _central_run

T = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
VOCAB = 320


def central_run(out, *overrides):
    return _central_run(out, "mode=central", *overrides)


def _text() -> str:
    if SHAKESPEARE.is_file():
        return SHAKESPEARE.read_text()[:200_000]
    from fedlowrank.data.text import pydoc_text

    return pydoc_text()[:200_000]


def _tokenizer(d: Path) -> None:
    """A byte-level BPE trained here (offline) on the shared Shakespeare text, saved as ``d/tokenizer.json``."""
    from fedlowrank.data.text import train_bpe

    train_bpe([_text()], VOCAB - 20, path=d / "tokenizer.json")


def _hf(kind: str, d: Path, **kw):
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = T.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, **kw)
        model = T.GPT2LMHeadModel(cfg)
    else:
        base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=64)
        model = T.LlamaForCausalLM(T.LlamaConfig(**{**base, **kw}))
    model.eval()
    model.save_pretrained(d, **({"max_shard_size": "20KB"} if kind == "llama-sharded" else {}))
    return model


def _logits(model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(idx)
    return out.logits if hasattr(out, "logits") else out


CASES = {
    "gpt2": ("gpt2", {}),
    "llama": ("llama", {}),
    "llama-gqa": ("llama", {"num_key_value_heads": 2, "rope_theta": 500000.0, "rms_norm_eps": 1e-5}),
    "llama-tied": ("llama", {"num_key_value_heads": 1, "tie_word_embeddings": True}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_loaded_model_gives_transformers_logits(tmp_path, case):
    kind, kw = CASES[case]
    hf = _hf(kind, tmp_path, **kw)
    ours, _ = load_pretrained(str(tmp_path))
    ours.eval()
    idx = torch.randint(0, VOCAB, (2, 48))
    assert (_logits(ours, idx) - _logits(hf, idx)).abs().max() <= 1e-5
    if "num_key_value_heads" in kw:  # the GQA projections really are narrower
        assert ours.layers[0].attn.k_proj.weight.shape == (kw["num_key_value_heads"] * 8, 32)


def test_sharded_checkpoint_loads_through_its_index(tmp_path):
    hf = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, max_position_embeddings=64)).eval()
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    ours, _ = load_pretrained(str(tmp_path))
    idx = torch.randint(0, VOCAB, (1, 16))
    assert (_logits(ours.eval(), idx) - _logits(hf, idx)).abs().max() <= 1e-5
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = "../elsewhere.safetensors"  # an index may not reach outside its dir
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(PretrainedError, match="elsewhere"):
        load_pretrained(str(tmp_path))


class _Planted:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_only_checkpoint_is_refused_without_unpickling(tmp_path):
    _hf("llama", tmp_path)
    marker = tmp_path.parent / "unpickled"
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(_Planted(marker)))
    with pytest.raises(PretrainedError, match="never unpickled"):
        load_pretrained(str(tmp_path))
    with pytest.raises(ConfigError, match="never unpickled"):  # refused when the run is configured
        central_run(tmp_path / "run", "model=llama", f"model.pretrained={tmp_path}")
    assert not marker.exists()


@pytest.mark.parametrize("field,value", [("rope_scaling", {"rope_type": "linear", "factor": 2.0}),
                                         ("attention_bias", True), ("mlp_bias", True), ("hidden_act", "gelu"),
                                         ("sliding_window", 4096)])
def test_unrepresentable_config_is_refused_naming_the_field(field, value):
    cfg = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
           "num_hidden_layers": 1, "num_attention_heads": 2, field: value}
    with pytest.raises(PretrainedError, match=field):
        llama_config(cfg)


def test_wrong_arch_and_long_context_are_config_errors(tmp_path):
    _hf("gpt2", tmp_path)
    with pytest.raises(ConfigError, match="gpt2 checkpoint; use model=gpt2"):
        central_run(tmp_path / "r", "model=llama", f"model.pretrained={tmp_path}")
    with pytest.raises(ConfigError, match="64 positions"):
        central_run(tmp_path / "r", "model=gpt2", f"model.pretrained={tmp_path}", "trainer.block_size=128")


def test_offline_repo_id_fails_with_exit_code_2(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    res = subprocess.run([sys.executable, "main.py", "mode=central", "model=llama",
                          "model.pretrained=no-such-org/no-such-model", f"out_dir={tmp_path / 'out'}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "downloading it from the Hugging Face hub failed" in res.stderr + res.stdout


def test_export_of_a_loaded_checkpoint_round_trips_through_transformers(tmp_path):
    hf = _hf("llama", tmp_path / "in", num_key_value_heads=2)
    export(tmp_path / "in", tmp_path / "out")
    back = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    idx = torch.randint(0, VOCAB, (2, 32))
    assert (_logits(back, idx) - _logits(hf, idx)).abs().max() <= 1e-5


def _ours_from_checkpoint(run, out: Path):
    """The run's own model (factorized / adapted, as trained) with the last checkpoint's weights."""
    from fedlowrank.central.dist import load_weights
    from fedlowrank.central.hooks import make_hook
    from fedlowrank.central.model import build_lm

    model = build_lm(run, VOCAB)
    meta = json.loads((out / "checkpoints" / "last" / "meta.json").read_text())
    hook = make_hook(run.method, run.seed, run.trainer.max_steps)

    class _Tr:  # the hook's restore needs only the model
        pass

    tr = _Tr()
    tr.model = model
    hook.restore(tr, meta["method_state"])
    load_weights(model, out / "checkpoints" / "last")
    return model.eval()


@pytest.mark.parametrize("method", [
    ["model.lowrank=fixed", "model.ratio=0.5"],
    ["method=relora", "method.warm_start_steps=0", "method.r=2", "method.reset_every=3", "method.restart_warmup_steps=1"],
    ["method=welore", "method.pretrain_steps=0", "method.target_reduction=0.3"],
    ["model.lowrank=inrank", "method=inrank", "method.stage1_steps=2", "method.check_interval=1",
     "method.warmup_steps=0", "method.init_rank=2", "method.buffer=2"],
    [],
], ids=["fixed", "relora", "welore", "inrank", "dense"])
def test_pretrained_run_trains_resumes_and_exports(tmp_path, method):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    _hf("llama", ckpt, num_key_value_heads=2)
    _tokenizer(ckpt)
    common = ["model=llama", f"model.pretrained={ckpt}", "data=textfile", f"data.train_path={_write_text(tmp_path)}",
              "trainer.max_steps=6", "trainer.block_size=32", "trainer.eval_interval=3", "trainer.ckpt_interval=3",
              "trainer.log_interval=1", *method]
    full = launch(central_run(tmp_path / "full", *common))
    launch(central_run(tmp_path / "part", *common, "trainer.stop_after=3"))
    resumed = launch(central_run(tmp_path / "part", *common, "trainer.resume=auto"))
    assert [round(x, 6) for _, x in resumed["losses"]] == [round(x, 6) for _, x in full["losses"]]
    assert (tmp_path / "full" / "tokenizer" / "tokenizer.json").is_file()
    summary = export(tmp_path / "full", tmp_path / "hf")
    assert "tokenizer.json" in summary["tokenizer_files"]
    assert (summary["params_stored"] == summary["params_dense"]) == (not method)  # low-rank forms are merged
    back = T.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = _ours_from_checkpoint(central_run(tmp_path / "full", *common), tmp_path / "full")
    idx = torch.randint(0, VOCAB, (2, 32))
    assert (_logits(back, idx) - _logits(ours, idx)).abs().max() <= 1e-5
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json")).get_vocab_size() <= VOCAB


def _write_text(tmp_path: Path) -> Path:
    p = tmp_path / "corpus.txt"
    if not p.exists():
        p.write_text(_text()[:40_000])
    return p


def test_resolve_refuses_paths_that_are_not_directories(tmp_path):
    (tmp_path / "file").write_text("x")
    for bad in (str(tmp_path / "file"), str(tmp_path / "missing"), "./relative/missing"):
        with pytest.raises(PretrainedError, match="neither a checkpoint directory nor a hub repo id"):
            resolve(bad)


@pytest.mark.parametrize("lowrank", [[], ["model.lowrank=fixed", "model.ratio=1.0"]], ids=["dense", "full-rank factors"])
def test_a_pretrained_run_starts_from_the_checkpoint(tmp_path, lowrank):
    from fedlowrank.central.model import build_lm

    hf = _hf("gpt2", tmp_path)
    model = build_lm(central_run(tmp_path / "r", "model=gpt2", f"model.pretrained={tmp_path}", *lowrank), 256).eval()
    idx = torch.randint(0, VOCAB, (2, 32))
    assert (_logits(model, idx) - _logits(hf, idx)).abs().max() <= (1e-5 if not lowrank else 1e-4)


def test_welore_on_a_pretrained_model_reports_before_after_and_finetuned(tmp_path):
    """experiment=llama_welore_pretrained: the 'before' perplexity is the checkpoint's own (recomputed here with
    transformers over the same held-out windows), compression removes parameters, fine-tuning follows."""
    import torch.nn.functional as F

    from fedlowrank.data.text import load_text_data

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    hf = _hf("llama", ckpt, num_key_value_heads=2)
    _tokenizer(ckpt)
    corpus = _write_text(tmp_path)
    res = launch(central_run(tmp_path / "w", "experiment=llama_welore_pretrained", f"model.pretrained={ckpt}",
                             "data=textfile", f"data.train_path={corpus}", "trainer.max_steps=4",
                             "trainer.block_size=32", "trainer.eval_full=true", "trainer.eval_interval=4"))
    w = json.loads((tmp_path / "w" / "summary.json").read_text())["welore"]
    val = load_text_data("textfile", str(ckpt), train_path=str(corpus)).val
    starts = range(0, len(val) - 33 + 1, 32)
    with torch.no_grad():
        x = torch.stack([val[s: s + 32] for s in starts])
        y = torch.stack([val[s + 1: s + 33] for s in starts])
        loss = F.cross_entropy(_logits(hf, x).reshape(-1, VOCAB), y.reshape(-1)).item()
    assert w["dense_eval"]["loss"] == pytest.approx(loss, abs=1e-4)
    assert w["params_after"] < w["params_before"] and 0 < w["params_reduction"] < 1
    assert w["compressed_eval"]["loss"] != w["dense_eval"]["loss"] and res["final_eval"]["step"] == 4
    with pytest.raises(ConfigError, match="model.pretrained"):  # the experiment needs a model to compress
        central_run(tmp_path / "x", "experiment=llama_welore_pretrained")


def test_prepare_train_resume_export_one_pretrained_model(tmp_path):
    """The whole path on one tiny checkpoint: shards tokenized with its own tokenizer, a fixed-rank fine-tune from
    the shards that resumes exactly, an export transformers loads, and a sample from the export."""
    from fedlowrank.central.sample import load_for_sampling
    from fedlowrank.data.prepare import main as prepare_main

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    _hf("llama", ckpt, num_key_value_heads=2)
    _tokenizer(ckpt)
    assert prepare_main(["--out", str(tmp_path / "shards"), "--tokenizer", str(ckpt), "--workers", "2",
                         "--val-fraction", "0.1", str(_write_text(tmp_path))]) == 0
    common = ["model=llama", f"model.pretrained={ckpt}", "data=tokens", f"data.dir={tmp_path / 'shards'}",
              "model.lowrank=fixed", "model.ratio=0.5", "trainer.max_steps=6", "trainer.block_size=32",
              "trainer.ckpt_interval=3", "trainer.eval_interval=3", "trainer.log_interval=1"]
    full = launch(central_run(tmp_path / "full", *common))
    launch(central_run(tmp_path / "part", *common, "trainer.stop_after=3"))
    assert launch(central_run(tmp_path / "part", *common, "trainer.resume=auto"))["losses"] == full["losses"]
    export(tmp_path / "full", tmp_path / "hf")
    back = T.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = _ours_from_checkpoint(central_run(tmp_path / "full", *common), tmp_path / "full")
    idx = torch.randint(0, VOCAB, (2, 32))
    assert (_logits(back, idx) - _logits(ours, idx)).abs().max() <= 1e-5
    model, tok = load_for_sampling(tmp_path / "hf")
    assert tok.vocab_size <= VOCAB and isinstance(tok.decode([1, 2, 3]), str)
