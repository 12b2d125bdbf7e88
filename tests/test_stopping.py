"""Stopping as a person expects: Ctrl-C (SIGINT) or SIGTERM ends a run without a traceback, exit 130 / 143, the
newest checkpoint kept (a central run saves one at the step it stops after), and the console prints the exact
command that resumes it, which does."""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedlowrank.stopping import resume_command

ROOT = Path(__file__).resolve().parents[1]


def test_the_resume_command_keeps_the_overrides_and_names_the_directory():
    argv = ["main.py", "mode=central", "experiment=llama_relora", "out_dir=old", "trainer.resume=null", "seed=3"]
    cmd = shlex.split(resume_command(argv, "/runs/a b", "central"))
    assert cmd[1:] == ["main.py", "mode=central", "experiment=llama_relora", "seed=3", "out_dir=/runs/a b",
                       "trainer.resume=auto"]
    assert resume_command(["main.py", "mode=federated"], "/r", "federated").endswith("out_dir=/r fed.resume=auto")
    assert resume_command(["main.py", "mode=sample"], "/r", "sample") is None


def _start(args: list[str], out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "main.py"), *args, f"out_dir={out}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


def _wait_for(out: Path, pattern: str, proc: subprocess.Popen, limit: float = 150) -> None:
    deadline = time.time() + limit
    while time.time() < deadline and proc.poll() is None:
        log = out / "main.log"
        if log.is_file() and pattern in log.read_text():
            return
        time.sleep(0.2)
    raise AssertionError(f"{pattern!r} never appeared")


@pytest.mark.timeout(300)
def test_ctrl_c_stops_a_central_run_after_a_whole_step_with_a_checkpoint_and_the_resume_command(tmp_path):
    args = ["mode=central", "experiment=llama_full", "trainer.max_steps=100000", "trainer.ckpt_interval=100000",
            "trainer.eval_interval=100000", "trainer.log_interval=1", "trainer.progress=false", "trainer.device=cpu"]
    proc = _start(args, tmp_path)
    deadline = time.time() + 150
    while not (tmp_path / "tb").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)  # the TensorBoard directory opens right before the first step
    time.sleep(2.0)  # a few steps (a tiny LLaMA takes milliseconds a step)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in out, out[-3000:]
    steps = sorted((tmp_path / "checkpoints").glob("step-*"))
    assert steps and int(steps[-1].name.split("-")[1]) >= 1  # saved at the step it stopped after
    line = out.splitlines()[out.splitlines().index(next(ln for ln in out.splitlines() if "resume with:" in ln)) + 1]
    cmd = shlex.split(line.strip())
    assert cmd[-2:] == [f"out_dir={tmp_path}", "trainer.resume=auto"]
    cmd = [sys.executable, *cmd[1:]]
    cmd[cmd.index("trainer.max_steps=100000")] = f"trainer.max_steps={int(steps[-1].name.split('-')[1]) + 2}"
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=200,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0 and f"resumed from {steps[-1]}" in done.stdout + done.stderr


@pytest.mark.slow  # about 60 s: the simulation's start-up, then its bounded stop
@pytest.mark.timeout(300)
def test_sigterm_stops_a_federated_run_with_exit_143_and_the_resume_command(tmp_path):
    proc = _start(["mode=federated", "fed.rounds=200"], tmp_path)
    _wait_for(tmp_path, "round 2/200: accuracy", proc, 200)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=150)
    assert proc.returncode == 143 and "Traceback" not in out, out[-3000:]
    assert f"out_dir={tmp_path} fed.resume=auto" in out and "stopped (SIGTERM)" in out
    assert sorted((tmp_path / "checkpoints").glob("round-*"))
