"""Crash-safe checkpoints: atomic save, kill at every stage, no pickle, non-finite stop, named errors."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedlowrank.central import launch
from fedlowrank.central.trainer import Trainer
from fedlowrank.checkpoint import (STAGES, CheckpointError, append_jsonl, is_complete, latest_complete, load_tensors,
                                   read_json, read_jsonl, write_checkpoint_dir)
from fedlowrank.config import ConfigError

from helpers import FAST, central_run

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["experiment=gpt2_fixed", "model.ratio=0.25", "trainer.max_steps=12", "trainer.ckpt_interval=4",
          "trainer.log_interval=1", "trainer.eval_interval=12", "model.dropout=0.1"]


def _losses(res):
    return dict((s, l) for s, l in res["losses"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return launch(central_run(tmp_path_factory.mktemp("ref"), *COMMON))


@pytest.mark.parametrize("stage", STAGES)
def test_kill_at_every_save_stage_then_auto_resume_matches_uninterrupted(tmp_path, stage, reference):
    """A kill while step 8 is being saved: resume=auto restarts from the newest *complete* checkpoint
    (step 4 before the rename, step 8 after) and ends exactly where the uninterrupted run does."""
    cmd = [sys.executable, "main.py", "mode=central", *FAST, *COMMON, f"out_dir={tmp_path}",
           f"hydra.run.dir={tmp_path}/hydra"]
    env = dict(os.environ, FEDLOWRANK_CRASH_AT=f"{stage}@step-{8:09d}")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 70, proc.stderr[-2000:]  # the simulated kill happened
    newest = latest_complete(tmp_path / "checkpoints")
    expect = 8 if STAGES.index(stage) >= STAGES.index("renamed") else 4
    assert newest is not None and newest.name == f"step-{expect:09d}"
    res = launch(central_run(tmp_path, *COMMON, "trainer.resume=auto"))
    assert res["step"] == 12
    ref, got = _losses(reference), _losses(res)
    assert sorted(got) == list(range(1, 13))
    for s in range(1, 13):
        assert got[s] == pytest.approx(ref[s], rel=1e-5, abs=1e-6), f"step {s}"
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert ckpts == [f"step-{8:09d}", f"step-{12:09d}"]  # keep_checkpoints=2, leftovers cleaned
    assert (tmp_path / "checkpoints" / "last").resolve().name == f"step-{12:09d}"


def test_planted_pickle_in_trainer_state_does_not_run(tmp_path):
    launch(central_run(tmp_path, *COMMON, "trainer.max_steps=4"))
    ckpt = (tmp_path / "checkpoints" / "last").resolve()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"optimizer": Evil(), "rng": [], "step": 4}, ckpt / "trainer.pt")
    with pytest.raises(CheckpointError, match="trainer.pt"):
        launch(central_run(tmp_path, *COMMON, f"trainer.resume={ckpt}"))
    assert not marker.exists()
    assert not is_complete(ckpt)  # the manifest also exposes the swapped file
    assert latest_complete(tmp_path / "checkpoints") is None


def test_non_finite_loss_stops_at_that_step_and_keeps_last_finite_checkpoint(tmp_path, monkeypatch):
    real = Trainer.train_step

    def poisoned(self):
        loss = real(self)
        if self.step == 7:  # the weights themselves go bad: every later step would be NaN too
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("nan"))
            return loss * float("nan")
        return loss

    monkeypatch.setattr(Trainer, "train_step", poisoned)
    with pytest.raises(FloatingPointError, match="step 7"):
        launch(central_run(tmp_path, *COMMON))
    newest = latest_complete(tmp_path / "checkpoints")
    assert newest is not None and newest.name == f"step-{4:09d}"
    assert all(torch.isfinite(v).all() for v in load_tensors(newest / "model.safetensors").values())


def test_corrupted_files_give_errors_that_name_them(tmp_path):
    launch(central_run(tmp_path, *COMMON, "trainer.max_steps=4"))
    ckpt = (tmp_path / "checkpoints" / "last").resolve()
    for name, cut in (("model.safetensors", 100), ("trainer.pt", 50), ("meta.json", 10)):
        f = ckpt / name
        saved = f.read_bytes()
        f.write_bytes(saved[:cut])
        with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
            launch(central_run(tmp_path, *COMMON, f"trainer.resume={ckpt}"))
        f.write_bytes(saved)
    assert is_complete(ckpt)


def test_atomic_dir_keeps_previous_until_new_is_complete(tmp_path):
    def writer(payload):
        return lambda d: (d / "a.bin").write_bytes(payload)

    write_checkpoint_dir(tmp_path / "step-1", writer(b"one"))
    assert is_complete(tmp_path / "step-1")
    (tmp_path / "step-2.tmp").mkdir()  # a save killed before its manifest
    (tmp_path / "step-2.tmp" / "a.bin").write_bytes(b"tw")
    (tmp_path / "step-3").mkdir()  # renamed by hand but missing its manifest
    assert latest_complete(tmp_path).name == "step-1"
    (tmp_path / "step-1" / "a.bin").write_bytes(b"ONE")  # same size, different bytes
    assert not is_complete(tmp_path / "step-1")


def test_jsonl_log_drops_only_a_cut_last_line(tmp_path):
    f = tmp_path / "log.jsonl"
    for i in range(3):
        append_jsonl(f, {"round": i})
    with open(f, "a") as h:
        h.write('{"round": 3, "lo')
    assert [r["round"] for r in read_jsonl(f)] == [0, 1, 2]
    f.write_text('{"round": 0}\n{bad\n{"round": 2}\n')
    with pytest.raises(CheckpointError, match="line 2"):
        read_jsonl(f)
    (tmp_path / "m.json").write_text('{"a": ')
    with pytest.raises(CheckpointError, match="m.json"):
        read_json(tmp_path / "m.json")


def test_compile_really_compiles_on_cpu_and_matches_eager(tmp_path):
    common = [*COMMON, "trainer.max_steps=3", "model.dropout=0.0", "trainer.ckpt_interval=100"]
    from torch._dynamo.utils import counters

    eager = launch(central_run(tmp_path / "e", *common))
    counters.clear()
    comp = launch(central_run(tmp_path / "c", *common, "trainer.compile=true", "trainer.compile_backend=aot_eager"))
    assert eager["compiles"] == 0 and comp["compiles"] == 1 and comp["graph_compile_steps"] == [0]
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo captured the model's forward
    for (_, a), (_, b) in zip(eager["losses"], comp["losses"]):
        assert b == pytest.approx(a, rel=1e-4)
    with pytest.raises(ConfigError, match="compile_backend"):
        central_run(tmp_path, *COMMON, "trainer.compile=true", "trainer.compile_backend=nope")


def test_compile_recompiles_only_when_inrank_changes_shapes(tmp_path):
    """Checks every 2 steps; a graph is compiled at the start and after each check that grew a rank
    (and at the stage-1 compression), never at checks that changed nothing; losses match eager."""
    common = ["experiment=gpt2_inrank", "trainer.log_interval=1", "model.size=tiny", "trainer.max_steps=20", "method.stage1_steps=16",
              "method.check_interval=2", "method.init_rank=1", "method.buffer=2", "trainer.ckpt_interval=100",
              "trainer.eval_interval=100", "model.dropout=0.0"]
    eager = launch(central_run(tmp_path / "e", *common))
    comp = launch(central_run(tmp_path / "c", *common, "trainer.compile=true", "trainer.compile_backend=aot_eager"))
    grew = [h["step"] for h in comp["inrank_history"]]
    assert grew and grew == [h["step"] for h in eager["inrank_history"]]
    steps = comp["graph_compile_steps"]
    assert steps[0] == 0 and len(steps) == len(set(steps)) == comp["graph_compiles"]
    assert set(grew) <= set(steps) <= {0, 16, *grew}  # 16: compression to the final ranks
    unchanged_checks = set(range(2, 16, 2)) - set(grew)
    assert unchanged_checks and not unchanged_checks & set(steps)
    for (_, a), (_, b) in zip(eager["losses"], comp["losses"]):
        assert b == pytest.approx(a, rel=1e-4)


@pytest.mark.parametrize("bad", ["trainer.stop_after=0", "trainer.stop_after=-5", "trainer.keep_checkpoints=0"])
def test_bad_stop_and_keep_rejected(tmp_path, bad):
    with pytest.raises(ConfigError, match=bad.split("=")[0]):
        central_run(tmp_path, *COMMON, bad)


def test_empty_eval_split_rejected_before_training(tmp_path):
    with pytest.raises(ConfigError, match="val_fraction"):
        central_run(tmp_path, *COMMON, "data.val_fraction=0")


@pytest.mark.parametrize("key", ["trainer.resume", "method.from_ckpt"])
def test_missing_checkpoint_paths_rejected_before_training(tmp_path, key):
    base = ["experiment=gpt2_full", "method=welore", "method.pretrain_steps=0"] if key == "method.from_ckpt" else COMMON
    with pytest.raises(ConfigError, match=key):
        central_run(tmp_path, *base, f"{key}={tmp_path / 'nope'}")
    assert not (tmp_path / "checkpoints").exists()
