"""Hostile and damaged Hugging Face checkpoints: every case is refused before any tensor or module is allocated,
through every entry point (``python -m fedlowrank.export``, ``mode=sample``'s loader, a central run's
validation, ``main.py``), with one line naming the file and the field or tensor; a refused load's peak RSS stays
within 1.2x a normal load's (measured under an address-space limit that a real allocation would hit)."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from fedlowrank.central.sample import load_for_sampling
from fedlowrank.config import ConfigError
from fedlowrank.export import main as export_main

from helpers import central_run

T = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    """Tiny random GPT-2 and LLaMA (2 layers) saved by transformers itself."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    T.GPT2LMHeadModel(T.GPT2Config(vocab_size=320, n_positions=64, n_embd=32, n_layer=2, n_head=4)).save_pretrained(
        root / "gpt2")
    T.LlamaForCausalLM(T.LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=64)).save_pretrained(root / "llama")
    return {"gpt2": root / "gpt2", "llama": root / "llama"}


def _header_file(path: Path, header: dict, data: bytes, length: int | None = None) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes((len(raw) if length is None else length).to_bytes(8, "little") + raw + data)


def _config(**fields):
    def edit(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(fields)
        (d / "config.json").write_text(json.dumps(cfg))
    return edit


def _nested(d: Path) -> None:
    (d / "config.json").write_text('{"a": ' * 200_000 + "1" + "}" * 200_000)


def _huge_tensor(d: Path) -> None:
    _header_file(d / "model.safetensors", {"x": {"dtype": "F32", "shape": [10**9, 10**9], "data_offsets": [0, 16]}},
                 bytes(16))


def _overlap(d: Path) -> None:
    _header_file(d / "model.safetensors", {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                                           "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, bytes(24))


def _header_2_62(d: Path) -> None:
    _header_file(d / "model.safetensors", {}, b"", length=2**62)


def _truncated(d: Path) -> None:
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])


def _int_weights(d: Path) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(str(d / "model.safetensors"))
    sd["model.norm.weight"] = torch.ones(32, dtype=torch.int32)
    save_file(sd, str(d / "model.safetensors"))


# (arch, edit, what the one-line error must name: file, field or tensor)
CASES = {
    "vocab 1e9": ("llama", _config(vocab_size=10**9), ["config.json", "vocab_size"]),
    "hidden 1e9": ("llama", _config(hidden_size=10**9), ["config.json", "hidden_size"]),
    "intermediate 1e9": ("llama", _config(intermediate_size=10**9), ["config.json", "intermediate_size"]),
    "layers 1e6": ("llama", _config(num_hidden_layers=10**6), ["config.json", "num_hidden_layers"]),
    "vocab within bounds, not the weights'": ("llama", _config(vocab_size=16_000_000),
                                              ["model.safetensors", "model.embed_tokens.weight", "config.json"]),
    "width within bounds, not the weights'": ("gpt2", _config(n_embd=4096), ["model.safetensors", "config.json"]),
    "kv heads not dividing": ("llama", _config(num_key_value_heads=3), ["config.json", "num_key_value_heads"]),
    "size as a string": ("llama", _config(hidden_size="64"), ["config.json", "hidden_size"]),
    "size as a float": ("gpt2", _config(n_layer=2.0), ["config.json", "n_layer"]),
    "heads not dividing (gpt2)": ("gpt2", _config(n_head=3), ["config.json", "n_head"]),
    "epsilon infinite": ("llama", _config(rms_norm_eps=float("inf")), ["config.json", "rms_norm_eps"]),
    "rope_scaling not an object": ("llama", _config(rope_scaling="linear"), ["config.json", "rope_scaling"]),
    "config nested 200k deep": ("llama", _nested, ["config.json", "nested"]),
    "negative layers": ("llama", _config(num_hidden_layers=-1), ["config.json", "num_hidden_layers"]),
    "zero heads": ("gpt2", _config(n_head=0), ["config.json", "n_head"]),
    "1-layer config, 2-layer weights": ("llama", _config(num_hidden_layers=1),
                                        ["config.json", "unexpected tensors", "model.layers.1.", "holds 2 layers"]),
    "3-layer config, 2-layer weights": ("gpt2", _config(n_layer=3),
                                        ["config.json", "missing tensors", "transformer.h.2.", "holds 2 layers"]),
    "header: 1e9 x 1e9 tensor": ("llama", _huge_tensor, ["model.safetensors", "'x'", "needs"]),
    "header: overlapping offsets": ("llama", _overlap, ["model.safetensors", "'b'", "overlap"]),
    "header length 2^62": ("llama", _header_2_62, ["model.safetensors", "header length"]),
    "truncated file": ("gpt2", _truncated, ["model.safetensors", "truncated"]),
    "integer weights": ("llama", _int_weights, ["model.safetensors", "model.norm.weight", "I32"]),
}


@pytest.fixture(params=sorted(CASES))
def hostile(request, base, tmp_path) -> tuple[str, Path, list[str]]:
    arch, edit, names = CASES[request.param]
    d = tmp_path / "ckpt"
    shutil.copytree(base[arch], d)
    edit(d)
    return arch, d, names


def _one_line(msg: str, names: list[str]) -> None:
    assert "\n" not in msg and len(msg) < 600, msg
    for n in names:
        assert n in msg, (n, msg)


def test_export_refuses_with_exit_2_and_one_line(hostile, tmp_path, caplog):
    _, d, names = hostile
    with caplog.at_level(logging.ERROR, logger="fedlowrank.export"):
        assert export_main([str(d), str(tmp_path / "out")]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    _one_line(errors[0], names)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_sampling_and_central_runs_refuse_before_work(hostile, tmp_path):
    arch, d, names = hostile
    with pytest.raises(ConfigError) as e:
        load_for_sampling(d)
    _one_line(str(e.value), names)
    with pytest.raises(ConfigError) as e:
        central_run(tmp_path / "run", "mode=central", f"model={arch}", f"model.pretrained={d}")
    _one_line(str(e.value), names)


def test_the_checked_loader_still_loads_what_transformers_saved(base):
    from fedlowrank.models.hf import load_pretrained

    for arch, d in base.items():
        model, _ = load_pretrained(str(d))
        ref = (T.GPT2LMHeadModel if arch == "gpt2" else T.LlamaForCausalLM).from_pretrained(d).eval()
        idx = torch.randint(0, 320, (2, 12))
        with torch.no_grad():
            assert torch.allclose(model.eval()(idx), ref(idx).logits, atol=1e-5)


def test_gpt2_base_model_names_and_mask_buffers_are_accepted(base, tmp_path):
    """The hub's ``gpt2`` stores GPT2Model names (no ``transformer.`` prefix) and the attention-mask buffers."""
    from safetensors.torch import load_file, save_file

    from fedlowrank.models.hf import load_pretrained

    d = tmp_path / "g"
    shutil.copytree(base["gpt2"], d)
    sd = {k.removeprefix("transformer."): v for k, v in load_file(str(d / "model.safetensors")).items()}
    sd |= {f"h.{i}.attn.bias": torch.tril(torch.ones(1, 1, 64, 64)) for i in range(2)}
    save_file(sd, str(d / "model.safetensors"))
    ours, _ = load_pretrained(str(d))
    ref, _ = load_pretrained(str(base["gpt2"]))
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), ref.state_dict().values()))


PROBE = """
import resource, sys
from fedlowrank.export import main
vm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmSize')) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), vm + (1 << 30)))  # a real multi-GB allocation fails
rc = main([sys.argv[1], sys.argv[2]])
print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(rc)
"""


def _probe(d: Path, out: Path) -> tuple[int, int, str]:
    p = subprocess.run([sys.executable, "-c", PROBE, str(d), str(out)], capture_output=True, text=True, timeout=120,
                       cwd=ROOT, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    rss = [int(line.split()[1]) for line in p.stdout.splitlines() if line.startswith("MAXRSS")]
    return p.returncode, rss[0] if rss else -1, p.stderr


@pytest.mark.timeout(300)
def test_refused_loads_stay_within_1_2x_a_normal_loads_memory(base, tmp_path):
    edits = {"vocab": _config(vocab_size=16_000_000),  # 2 GB of embeddings if built from the config
             "deep": _config(hidden_size=8192, num_hidden_layers=1000, head_dim=None),  # ~900 GB
             "header": _huge_tensor}
    dirs = {"ok": base["llama"]}
    for name, edit in edits.items():
        dirs[name] = tmp_path / name
        shutil.copytree(base["llama"], dirs[name])
        edit(dirs[name])
    with ThreadPoolExecutor(2) as pool:  # separate processes: each one's peak RSS is its own
        res = dict(zip(dirs, pool.map(lambda n: _probe(dirs[n], tmp_path / f"out-{n}"), dirs)))
    rc, normal, err = res.pop("ok")
    assert rc == 0, err
    for name, (rc, peak, err) in res.items():
        assert rc == 2 and "Traceback" not in err, (name, err[-2000:])
        assert 0 < peak <= 1.2 * normal, (name, peak, normal)


def _main(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=240, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


@pytest.mark.timeout(300)
def test_main_exits_2_without_a_traceback(base, tmp_path):
    d = tmp_path / "bad"
    shutil.copytree(base["llama"], d)
    _config(num_key_value_heads=3)(d)
    p = _main("mode=central", "model=llama", f"model.pretrained={d}", f"out_dir={tmp_path / 'o'}")
    assert p.returncode == 2 and "Traceback" not in p.stderr + p.stdout
    assert "num_key_value_heads" in p.stderr + p.stdout
    (base["llama"].parent / "tokdir").mkdir(exist_ok=True)
    s = tmp_path / "s"
    shutil.copytree(base["llama"], s)
    (s / "tokenizer.json").write_text('{"model": "garbage"')
    p = _main("mode=sample", f"ckpt={s}", f"out_dir={tmp_path / 'o2'}")
    out = p.stderr + p.stdout
    assert p.returncode == 2 and "Traceback" not in out and "tokenizer.json" in out and "hub" not in out


def test_prepare_names_a_garbage_tokenizer(tmp_path, caplog):
    from fedlowrank.data.prepare import main as prepare_main

    (tmp_path / "tok.json").write_text("not json")
    (tmp_path / "a.txt").write_text("hello\n")
    with caplog.at_level(logging.ERROR):
        assert prepare_main(["--out", str(tmp_path / "s"), "--tokenizer", str(tmp_path / "tok.json"),
                             str(tmp_path / "a.txt")]) == 2
    msg = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    assert "tok.json" in msg and "hub" not in msg


def test_prepare_names_a_file_that_is_not_utf8(tmp_path, caplog):
    from fedlowrank.data.prepare import main as prepare_main

    (tmp_path / "bad.txt").write_bytes(b"hello\n" * 10 + b"\xff\xfe\n")
    with caplog.at_level(logging.ERROR):
        assert prepare_main(["--out", str(tmp_path / "s"), str(tmp_path / "bad.txt")]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "bad.txt" in errors[0] and "UTF-8" in errors[0]
