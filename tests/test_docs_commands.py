"""Every documented command runs as written: the shell blocks of README.md and docs/*.md are extracted; each
``main.py`` command's overrides must compose and pass the run's validation (the checks a run makes before any
work: keys, types, data paths); the offline, CPU-cheap ones are run to completion. Commands with a ``<placeholder>``
are templates, and a user's own corpus file (``data.train_path=corpus.txt``) is stood in for by a small text."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import CONF, compose_cfg

from fedlowrank.central import central_run_from_cfg
from fedlowrank.config import federated_run_from_cfg
from fedlowrank.config.cli import unknown_override

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
USER_FILES = ("data.train_path=",)  # a user's own file: stood in for by a small text
# documented commands that need what a test cannot have here: the internet's datasets or prepared shards
NEEDS = {"data=tokens": "token shards written by the prepare command before it (a hub dataset)"}
# offline and CPU-cheap (seconds): run to completion as written, with only out_dir added
CHEAP = ("mode=central experiment=gpt2_inrank", "mode=central model=resnet data=digits",
         "mode=central model=lstm data=shakespeare", "data=textfile data.train_path=corpus.txt model.lowrank=fixed")


def commands() -> list[tuple[str, str]]:
    """(where, command line) of every shell line of a fenced bash block, continuations joined."""
    out = []
    for doc in DOCS:
        text = doc.read_text()
        for m in re.finditer(r"```(?:bash|sh|shell)\n(.*?)```", text, re.S):
            line_no = text[: m.start()].count("\n") + 2
            for i, line in enumerate(m.group(1).replace("\\\n", " ").splitlines()):
                if line.strip() and not line.strip().startswith("#"):
                    out.append((f"{doc.relative_to(ROOT)}:{line_no + i}", line.strip()))
    return out


def main_args(line: str) -> list[str] | None:
    """The arguments after ``main.py`` (comments dropped), or None for other commands."""
    if "main.py" not in line:
        return None
    words = shlex.split(line, comments=True)
    return words[words.index("main.py") + 1:] if "main.py" in words else None


MAIN = [(where, line, main_args(line)) for where, line in commands() if main_args(line) is not None]


def _needs_corpus(cfg) -> bool:
    """A composed Shakespeare run on the default ``data.path`` where neither that file (``../shared``, beside the
    checkout) nor the downloaded cache is here: offline, it can only stop with exit 2 naming the path."""
    from fedlowrank.data.fetch import DEFAULT_PATH, SHA256, cache_dir

    default = cfg.get("data", {}).get("name") == "shakespeare" and cfg.data.get("path") in (None, DEFAULT_PATH)
    here = (ROOT / DEFAULT_PATH).is_file() or (cache_dir() / f"tinyshakespeare-{SHA256[:12]}.txt").is_file()
    return default and not here


def _stand_ins(args: list[str], tmp_path: Path) -> list[str]:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"Line {i} of a user's own corpus, plain UTF-8 text.\n" for i in range(2000)))
    return [f"{a.split('=')[0]}={corpus}" if a.startswith(USER_FILES) else a for a in args]


def test_the_docs_have_main_commands():
    assert len(MAIN) >= 15 and any("mode=federated" in line for _, line, _ in MAIN)


@pytest.mark.parametrize("where,line,args", MAIN, ids=[w for w, _, _ in MAIN])
def test_documented_command_composes_and_validates(where, line, args, tmp_path):
    if any("<" in a for a in args):
        pytest.skip(f"a template: {line}")
    gpus = max([int(a.split("=")[1]) for a in args if a.startswith("trainer.devices=")] or [0])
    if gpus > max(1, torch.cuda.device_count()):
        pytest.skip(f"needs {gpus} GPUs: {line}")
    need = next((why for key, why in NEEDS.items() if key in args), None)
    if need:
        pytest.skip(f"needs {need}")
    args = _stand_ins(args, tmp_path)
    assert unknown_override(args, str(CONF)) is None, where
    cfg = compose_cfg(*args, f"out_dir={tmp_path / 'out'}")
    if _needs_corpus(cfg):
        pytest.skip("needs ../shared/data/tinyshakespeare.txt or the cached download (offline here)")
    if cfg.get("run_mode") == "federated":
        federated_run_from_cfg(cfg)
    else:
        assert cfg.get("run_mode") == "central", where
        central_run_from_cfg(cfg)


RUN = list({tuple(a): (w, line, a) for w, line, a in reversed(MAIN)  # one run per distinct command (first place)
             if any(c in line for c in CHEAP) and "torchrun" not in line and "<" not in line}.values())


QUICK_START = ["mode=central", "experiment=gpt2_inrank"]  # the README's central quick start


@pytest.fixture(scope="module")
def quick_start(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One run of the README's central quick start (its out_dir, the process): the cheap-command test checks it
    and the sample/export templates run on it."""
    run_dir = tmp_path_factory.mktemp("quick") / "run"
    return run_dir, subprocess.run([sys.executable, "main.py", *QUICK_START, f"out_dir={run_dir}"], cwd=ROOT,
                                   capture_output=True, text=True, timeout=110)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where,line,args", RUN, ids=[w for w, _, _ in RUN])
def test_cheap_documented_command_runs_as_written(where, line, args, tmp_path, request):
    if _needs_corpus(compose_cfg(*_stand_ins(args, tmp_path))):
        pytest.skip("needs ../shared/data/tinyshakespeare.txt or the cached download (offline here)")
    if args == QUICK_START:
        out, proc = request.getfixturevalue("quick_start")
    else:
        out = tmp_path / "out"
        proc = subprocess.run([sys.executable, "main.py", *_stand_ins(args, tmp_path), f"out_dir={out}"], cwd=ROOT,
                              capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, (where, proc.stderr[-2000:])
    assert (out / "summary.json").is_file(), where


def test_every_cheap_pattern_matches_a_documented_command():
    for c in CHEAP:  # a renamed command must not silently leave this test running nothing
        assert any(c in line for _, line, _ in RUN), c


@pytest.mark.timeout(180)
def test_sample_and_export_templates_run_on_a_quick_start_run(tmp_path, quick_start):
    """The README's ``mode=sample`` and export commands, with ``outputs/<date>/<time>`` replaced by a run of the
    README's central quick start."""
    run_dir, done = quick_start
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for _, line in commands() if "outputs/<date>/<time>" in line]
    assert any("mode=sample" in line for line in lines) and any("fedlowrank.export" in line for line in lines)
    for line in lines:
        words = shlex.split(line.replace("outputs/<date>/<time>", str(run_dir)).replace("exported/", str(tmp_path / "exp")),
                            comments=True)
        words[0] = sys.executable if words[0].endswith("python") else words[0]
        if "main.py" in words:  # written where the test can see it, not under the checkout's outputs/
            words.append(f"out_dir={tmp_path / 'sample'}")
        proc = subprocess.run(words, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, (line, proc.stderr[-2000:])
    assert any((tmp_path / "exp").iterdir())
