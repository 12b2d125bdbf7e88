"""Token shards: prepare writes exactly the tokenizer's tokens (any worker count, any shard size), the memory-
mapped reader slices across shard boundaries like one array, batches equal the in-RAM path's and differ per
rank, a data=tokens run resumes exactly, and damaged shard directories are named."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedlowrank.central import launch
from fedlowrank.config import ConfigError
from fedlowrank.data.prepare import main as prepare_main
from fedlowrank.data.shards import open_split, read_meta
from fedlowrank.data.text import get_batch, pydoc_text

from helpers import central_run

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("corpus") / "text.txt"
    p.write_text(pydoc_text()[:300_000])
    return p


def _all(d: Path, split: str) -> np.ndarray:
    meta = read_meta(d)
    return np.concatenate([np.fromfile(d / s["file"], dtype=meta["dtype"]) for s in meta["splits"][split]["shards"]])


def test_prepare_writes_the_byte_tokens_whatever_the_workers_and_shard_size(tmp_path, corpus):
    assert prepare_main(["--out", str(tmp_path / "a"), "--workers", "1", "--val-fraction", "0.1", str(corpus)]) == 0
    assert prepare_main(["--out", str(tmp_path / "b"), "--workers", "2", "--shard-tokens", "7000",
                         "--val-fraction", "0.1", str(corpus)]) == 0
    raw = np.frombuffer(corpus.read_bytes(), dtype=np.uint8)
    for d in (tmp_path / "a", tmp_path / "b"):
        train, val = _all(d, "train"), _all(d, "val")
        assert np.array_equal(np.concatenate([train, val]), raw)  # lossless, in order
        assert abs(len(val) / len(raw) - 0.1) < 0.01 and read_meta(d)["dtype"] == "uint16"
    meta = read_meta(tmp_path / "b")
    assert len(meta["splits"]["train"]["shards"]) == -(-meta["splits"]["train"]["tokens"] // 7000)
    ref = torch.from_numpy(_all(tmp_path / "b", "train").astype(np.int64))
    tokens = open_split(tmp_path / "b", meta, "train")
    assert len(tokens) == len(ref)
    for a, b in ((0, 10), (6995, 7010), (13990, 21010), (len(ref) - 5, len(ref))):  # across shard boundaries
        assert torch.equal(tokens[a:b], ref[a:b])
    for step in range(3):
        for rank in (0, 1):
            xs, ys = get_batch(tokens, 4, 32, 0, step, rank)
            xr, yr = get_batch(ref, 4, 32, 0, step, rank)
            assert torch.equal(xs, xr) and torch.equal(ys, yr)
    assert not torch.equal(get_batch(tokens, 4, 32, 0, 0, 0)[0], get_batch(tokens, 4, 32, 0, 0, 1)[0])


def test_bpe_shards_keep_the_tokenizer_and_end_documents(tmp_path, corpus):
    from tokenizers import Tokenizer

    from fedlowrank.data.text import train_bpe

    tok = train_bpe([corpus.read_text()], 400, ("<|endoftext|>",), tmp_path / "tok.json")
    assert prepare_main(["--out", str(tmp_path / "s"), "--tokenizer", str(tmp_path / "tok.json"), "--workers", "2",
                         str(corpus)]) == 0
    meta = read_meta(tmp_path / "s")
    eos = tok.token_to_id("<|endoftext|>")
    assert meta["eos_id"] == eos and meta["vocab_size"] == tok.get_vocab_size()
    train, val = _all(tmp_path / "s", "train"), _all(tmp_path / "s", "val")
    assert train[-1] == eos and val[-1] == eos and (train == eos).sum() == 1  # the train part ends a document
    saved = Tokenizer.from_file(str(tmp_path / "s" / "tokenizer.json"))
    assert saved.decode(train[:-1].tolist()) + saved.decode(val[:-1].tolist()) == corpus.read_text()


def test_training_from_shards_resumes_exactly(tmp_path, corpus):
    assert prepare_main(["--out", str(tmp_path / "s"), "--workers", "1", "--shard-tokens", "50000", str(corpus)]) == 0
    common = ["experiment=llama_full", "data=tokens", f"data.dir={tmp_path / 's'}", "trainer.max_steps=8",
              "trainer.ckpt_interval=4", "trainer.eval_interval=4", "trainer.log_interval=1"]
    full = launch(central_run(tmp_path / "full", *common))
    launch(central_run(tmp_path / "part", *common, "trainer.stop_after=4"))
    resumed = launch(central_run(tmp_path / "part", *common, "trainer.resume=auto"))
    assert resumed["losses"] == full["losses"] and resumed["final_eval"] == full["final_eval"]


def test_damaged_shard_directories_are_named(tmp_path, corpus):
    d = tmp_path / "s"
    assert prepare_main(["--out", str(d), "--workers", "1", str(corpus)]) == 0
    with (d / "val_000000.bin").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ConfigError, match="val_000000.bin"):
        open_split(d, read_meta(d), "val")
    (d / "meta.json").write_text("{")
    with pytest.raises(ConfigError, match="meta.json"):
        central_run(tmp_path / "r", "experiment=llama_full", "data=tokens", f"data.dir={d}")
    with pytest.raises(ConfigError, match="data.dir"):
        central_run(tmp_path / "r", "experiment=llama_full", "data=tokens")
    assert prepare_main(["--out", str(tmp_path / "x"), str(tmp_path / "missing.txt")]) == 2


def _bpe(text: str, llama: bool):
    """A small BPE trained here: GPT-2 style (byte-level, ``<|endoftext|>``) or LLaMA style (Metaspace pieces,
    ``<s>`` prepended to every encode by the post-processor, ``</s>`` as end of text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>" if llama else None))
    if llama:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        tok.decoder = decoders.Metaspace(prepend_scheme="first")
        specials = ["<unk>", "<s>", "</s>"]
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        specials = ["<|endoftext|>"]
    extra = {} if llama else {"initial_alphabet": pre_tokenizers.ByteLevel.alphabet()}
    tok.train_from_iterator([text[:300_000]], trainers.BpeTrainer(vocab_size=500, special_tokens=specials,
                                                                  show_progress=False, **extra))
    if llama:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


@pytest.mark.parametrize("style, workers", [("llama", "2"), ("gpt2", "1")])
def test_prepare_equals_the_tokenizers_own_encode_of_each_whole_document(tmp_path, style, workers):
    """A file longer than two of the old 1 MiB chunks: the shards hold exactly encode(train part) + [eos] and
    encode(held-out part) + [eos] (no BOS mid-document, no token split at a chunk cut). Both styles go through the
    same per-document encode; LLaMA's (a BOS every encode call) on the worker pool, GPT-2's in this process."""
    src = SHAKESPEARE.read_text() if SHAKESPEARE.is_file() else pydoc_text()
    src = "".join("  " + line for line in src.splitlines(True))  # every line end inside a learned '\n  ' token
    text = (src * (2_500_000 // len(src) + 1))[:2_500_000]
    corpus = tmp_path / "big.txt"
    corpus.write_text(text)
    tok = _bpe(text, style == "llama")
    tok.save(str(tmp_path / "tok.json"))
    eos = tok.token_to_id("</s>" if style == "llama" else "<|endoftext|>")
    raw = corpus.read_bytes()
    cut = raw.index(b"\n", int(len(raw) * 0.99) - 1) + 1  # the first line end at or past 99 % of the bytes
    want = {split: np.asarray(tok.encode(part.decode()).ids + [eos])
            for split, part in (("train", raw[:cut]), ("val", raw[cut:]))}
    if style == "llama":
        assert want["train"][0] == 1 and (want["train"] == 1).sum() == 1  # one <s>, at the start
    out = tmp_path / f"s{workers}"
    assert prepare_main(["--out", str(out), "--tokenizer", str(tmp_path / "tok.json"), "--workers", workers,
                         "--val-fraction", "0.01", str(corpus)]) == 0
    for split in ("train", "val"):
        assert np.array_equal(_all(out, split), want[split]), split


@pytest.mark.parametrize("field, value, named", [
    ("vocab_size", 10**9, "vocab_size"), ("vocab_size", 70_000, "vocab_size"), ("vocab_size", "256", "vocab_size"),
    ("dtype", ["uint16"], "dtype"), ("tokenizer", "../../elsewhere.json", "tokenizer"),
    ("splits", {"train": {"shards": [{"file": "train_000000.bin", "tokens": -5}]}, "val": {"shards": []}}, "tokens"),
])
def test_a_planted_shard_meta_is_named_before_the_model_is_built(tmp_path, corpus, field, value, named):
    """meta.json sizes the model (vocab_size) and names the tokenizer: a planted one is a ConfigError naming the
    file and field (uint16 shards cannot hold a vocabulary above 65,536)."""
    import json

    d = tmp_path / "s"
    assert prepare_main(["--out", str(d), "--workers", "1", str(corpus)]) == 0
    meta = json.loads((d / "meta.json").read_text())
    meta[field] = value
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=rf"meta.json: .*{named}"):
        central_run(tmp_path / "r", "experiment=llama_full", "data=tokens", f"data.dir={d}")
