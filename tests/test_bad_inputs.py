"""Bad inputs stop before any work with a message naming the key, the file or the limit (exit 2 from main.py):
unknown top-level keys, more CPU workers than cores, a split shorter than one window, and a run whose every
checkpoint is damaged (unless trainer.resume=auto_or_fresh)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedlowrank.central import launch
from fedlowrank.config import ConfigError

from helpers import central_run, compose_cfg

ROOT = Path(__file__).resolve().parents[1]


def test_unknown_top_level_keys_are_refused_in_every_mode(tmp_path):
    from fedlowrank.central import central_run_from_cfg
    from fedlowrank.config import federated_run_from_cfg

    with pytest.raises(ConfigError, match=r"unknown top-level key\(s\) \['bogus_key'\] in central mode"):
        central_run_from_cfg(compose_cfg("experiment=llama_full", "+bogus_key=1"))
    with pytest.raises(ConfigError, match=r"\['bogus'\] in federated mode"):
        federated_run_from_cfg(compose_cfg("+bogus=1"))


def test_cpu_workers_are_capped_at_the_cores(tmp_path):
    cores = len(os.sched_getaffinity(0))
    with pytest.raises(ConfigError, match=f"trainer.devices={cores + 1} .* {cores} core"):
        central_run(tmp_path, "experiment=llama_full", f"trainer.devices={cores + 1}")


def test_cpu_workers_are_capped_at_the_memory(tmp_path, monkeypatch):
    """More workers than the available memory holds stop before any spawn, naming the key and the limit; the
    estimate counts the model's parameters (a larger model needs more)."""
    from fedlowrank.central import launch, resources

    run = central_run(tmp_path, "experiment=llama_full", "trainer.devices=2")
    big = central_run(tmp_path, "experiment=llama_full", "trainer.devices=2", "model.size=mini")
    assert resources.model_params(big) > resources.model_params(run) > 0
    per = resources.WORKER_BASE_BYTES + resources.BYTES_PER_PARAM * resources.model_params(run)
    spawned = []
    monkeypatch.setattr("torch.multiprocessing.spawn", lambda *a, **k: spawned.append(a))
    monkeypatch.setattr(resources, "available_bytes", lambda: int(1.5 * per))
    with pytest.raises(ConfigError, match=r"trainer.devices=2 worker processes need about .* GB of memory is "
                                          r"available: use at most 1"):
        launch(run)
    assert spawned == []
    monkeypatch.setattr(resources, "available_bytes", lambda: 2 * per + 1)
    resources.check_worker_memory(run)  # fits: no error


def test_main_exits_2_on_a_split_too_short(tmp_path):
    (tmp_path / "t.txt").write_text("x" * 400)
    res = subprocess.run([sys.executable, "main.py", "mode=central", "data=textfile", f"data.train_path={tmp_path / 't.txt'}",
                          "trainer.device=cpu", f"out_dir={tmp_path / 'o'}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2, res.stderr[-1500:]
    assert "fewer than one window" in res.stdout + res.stderr and "Traceback" not in res.stdout + res.stderr


def test_every_checkpoint_damaged_stops_unless_auto_or_fresh(tmp_path):
    common = ["experiment=llama_full", "trainer.max_steps=4", "trainer.ckpt_interval=2", "trainer.log_interval=1"]
    launch(central_run(tmp_path, *common))
    for step in sorted((tmp_path / "checkpoints").glob("step-*")):
        with (step / "model.safetensors").open("r+b") as f:
            f.seek(100)
            f.write(b"\xff" * 8)
    with pytest.raises(ConfigError, match="every checkpoint under .* damaged; trainer.resume=auto_or_fresh"):
        launch(central_run(tmp_path, *common, "trainer.resume=auto"))
    res = launch(central_run(tmp_path, *common, "trainer.resume=auto_or_fresh"))
    assert res["step"] == 4 and res["losses"][0][0] == 1  # trained from step 0


def test_more_clients_than_examples_is_a_config_error_before_ray(tmp_path):
    from fedlowrank.config import federated_run_from_cfg
    from fedlowrank.runtime.runner import check_partitions

    fr = federated_run_from_cfg(compose_cfg("fed.num_clients=2000", f"out_dir={tmp_path}"))
    with pytest.raises(ConfigError, match="fed.num_clients=2000"):
        check_partitions(fr)


@pytest.mark.parametrize("value", ["5", "head", "[1,2]"])
def test_model_skip_must_be_a_list_of_regexes(tmp_path, value):
    from fedlowrank.config import federated_run_from_cfg

    with pytest.raises(ConfigError, match="model.skip must be a list of module-name regexes"):
        federated_run_from_cfg(compose_cfg(f"model.skip={value}", f"out_dir={tmp_path}"))


def test_a_damaged_rounds_log_tail_is_dropped_but_a_damaged_middle_is_named(tmp_path, caplog):
    import json

    from fedlowrank.checkpoint import CheckpointError
    from fedlowrank.federated.resume import read_rounds

    from fedlowrank.config import federated_run_from_cfg

    run = federated_run_from_cfg(compose_cfg(f"out_dir={tmp_path}"))

    def _read_rounds(path, rnd):
        return read_rounds(path, rnd, run)

    log = tmp_path / "rounds.jsonl"
    good = [json.dumps({"round": r, "train": {"round": r, "train_loss": 1.0 / r}}) for r in (1, 2, 3)]
    log.write_text("\n".join(good + ['{"round": 4, "tra', "garbage"]) + "\n")
    assert [r["round"] for r in _read_rounds(log, 3)] == [1, 2, 3]
    assert "line 4 is damaged" in caplog.text
    log.write_text("\n".join([good[0], "{not json", *good[1:]]) + "\n")
    with pytest.raises(CheckpointError, match=r"rounds.jsonl: line 2 is damaged .* round 3"):
        _read_rounds(log, 3)


def test_a_meta_json_without_step_is_named(tmp_path):
    from fedlowrank.checkpoint import CheckpointError

    common = ["experiment=llama_full", "trainer.max_steps=2", "trainer.ckpt_interval=2"]
    launch(central_run(tmp_path / "a", *common))
    ckpt = sorted((tmp_path / "a" / "checkpoints").glob("step-*"))[-1]
    (ckpt / "meta.json").write_text('{"hello": 1}')
    with pytest.raises(CheckpointError, match=r"meta.json: not a checkpoint's meta"):
        launch(central_run(tmp_path / "b", *common, f"trainer.resume={ckpt}", "trainer.max_steps=4"))
