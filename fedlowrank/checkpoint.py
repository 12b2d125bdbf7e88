"""Crash-safe files: atomic checkpoint directories with a verified manifest, atomic single
files, fsync'd JSONL logs, and loaders whose errors name the file.

A checkpoint directory is written as ``<name>.tmp``; every file is fsync'd, then a
``manifest.json`` (size and SHA-256 of each file) is written and fsync'd, the directory is
renamed to ``<name>`` and the parent directory fsync'd. A directory without a manifest that
matches its files is never used, so the previous good checkpoint stays the newest complete one
until the new one is whole.

Tests simulate a kill at each stage with ``FEDLOWRANK_CRASH_AT=<stage>@<checkpoint name>``
(see :data:`STAGES`): the process exits at once, as a SIGKILL would leave it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a tensor is loaded: the default runtime's launcher never loads one
    import torch

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STAGES = ("files_written", "manifest_written", "renamed", "linked")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or corrupted (the message names the file)."""


def _crash_point(stage: str, name: str) -> None:
    if os.environ.get("FEDLOWRANK_CRASH_AT") == f"{stage}@{name}":  # fault injection for the kill tests
        log.error("simulated kill at checkpoint stage %r", stage)
        os._exit(70)


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (its entries)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_checkpoint_dir(final: Path, write: Callable[[Path], None]) -> Path:
    """Atomically create directory ``final`` with the files ``write(tmp_dir)`` puts in it."""
    final = Path(final)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # leftovers of a save that was killed
    tmp.mkdir(parents=True)
    write(tmp)
    files = sorted(p for p in tmp.iterdir() if p.is_file())
    for p in files:
        fsync_path(p)
    _crash_point("files_written", final.name)
    manifest = {p.name: {"bytes": p.stat().st_size, "sha256": _digest(p)} for p in files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    fsync_path(tmp / MANIFEST)
    fsync_path(tmp)
    _crash_point("manifest_written", final.name)
    if final.exists():  # same name saved twice (e.g. re-run of a step): replace only once the new one is whole
        old = final.with_name(final.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    fsync_path(final.parent)
    _crash_point("renamed", final.name)
    return final


class BackgroundWriter:
    """Runs write jobs on one thread, in the order submitted, so a round's files reach the disk (fsyncs
    included) while the next round computes. A job's error is raised by a later :meth:`submit` or by
    :meth:`close`; at most ``depth`` jobs wait at once (a later submit waits for the oldest). Jobs must own
    their data (bytes serialized before submitting), never tensors the caller goes on changing."""

    def __init__(self, depth: int = 2) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedlowrank-writer")
        self._jobs: deque[Future] = deque()
        self.depth = depth

    def submit(self, fn: Callable[..., None], *args) -> None:
        """Queue ``fn(*args)`` after every job submitted before it."""
        while self._jobs and (self._jobs[0].done() or len(self._jobs) >= self.depth):
            self._jobs.popleft().result()  # re-raises a failed job's error here, in the caller's thread
        self._jobs.append(self._pool.submit(fn, *args))

    def close(self) -> None:
        """Wait for every queued job (raising the first error) and stop the thread; submitting after is an error."""
        try:
            while self._jobs:
                self._jobs.popleft().result()
        finally:
            self._jobs.clear()
            self._pool.shutdown(wait=True)


def is_complete(path: Path) -> bool:
    """True when ``path`` has a manifest and every listed file has the recorded size and digest."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        return all((path / n).is_file() and (path / n).stat().st_size == m["bytes"] and _digest(path / n) == m["sha256"]
                   for n, m in manifest.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return False


def complete_checkpoints(root: Path, prefix: str = "step-") -> list[Path]:
    """Complete checkpoint directories under ``root`` named ``<prefix><number>``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        num = p.name[len(prefix):]
        if p.is_dir() and p.name.startswith(prefix) and num.isdigit():
            found.append((int(num), p))
    return [p for _, p in sorted(found) if is_complete(p)]


def latest_complete(root: Path, prefix: str = "step-") -> Path | None:
    """The newest complete checkpoint under ``root``; incomplete ones are skipped with a warning."""
    root = Path(root)
    done = complete_checkpoints(root, prefix)
    skipped = [p.name for p in root.glob(f"{prefix}*") if p.is_dir() and p not in done] if root.is_dir() else []
    if skipped:
        log.warning("ignoring incomplete checkpoint(s) %s in %s", sorted(skipped), root)
    return done[-1] if done else None


def point_link(link: Path, target: Path) -> None:
    """Atomically make symlink ``link`` point at ``target`` (a sibling directory)."""
    link = Path(link)
    tmp = link.with_name(link.name + ".lnk")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(Path(target).name, tmp)
    if link.exists() and not link.is_symlink():  # a directory from an older layout
        shutil.rmtree(link)
    os.replace(tmp, link)
    fsync_path(link.parent)
    _crash_point("linked", Path(target).name)


def prune(root: Path, keep: int, prefix: str = "step-") -> None:
    """Delete all but the newest ``keep`` complete checkpoints (and stale ``.tmp`` leftovers)."""
    done = complete_checkpoints(root, prefix)
    for p in done[: max(0, len(done) - keep)]:
        shutil.rmtree(p, ignore_errors=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``path`` via a fsync'd temporary file and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def append_jsonl(path: Path, record: dict) -> None:
    """Append one JSON line and fsync it."""
    with open(path, "a") as f:
        f.write(json.dumps(record, default=float) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL log; a last line cut by a kill is dropped, any other bad line is an error."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except (json.JSONDecodeError, RecursionError) as e:
            if i == len(lines) - 1:
                log.warning("%s: dropping a truncated last line", path)
                break
            raise CheckpointError(f"{path}: line {i + 1} is corrupted ({e})") from e
    return out


def read_json(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return json.loads(path.read_text())
    except RecursionError:
        raise CheckpointError(f"{path}: JSON nested too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupted or truncated JSON ({e})") from e


def checked_int(v: object, lo: float, hi: float, where: str) -> int:
    """A resume-state field that must be an integer in [lo, hi] (not a bool, float or string)."""
    if type(v) is not int or not lo <= v <= hi:
        raise CheckpointError(f"{where}={repr(v)[:40]} must be an integer in [{lo}, {hi}]")
    return v


def checked_number(v: object, where: str, nan_ok: bool = False, minimum: float = -math.inf) -> float:
    """A resume-state field that must be a finite number >= ``minimum`` (NaN allowed with ``nan_ok``)."""
    ok = type(v) in (int, float) and not math.isinf(v) and (  # type: ignore[arg-type]
        (nan_ok and math.isnan(v)) or (not math.isnan(v) and v >= minimum))  # type: ignore[arg-type]
    if not ok:
        bound = f" >= {minimum:g}" if minimum > -math.inf else ""
        raise CheckpointError(f"{where}={repr(v)[:40]} must be a finite number{bound}")
    return float(v)  # type: ignore[arg-type]


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file as a dict (no pickle); its header is validated against the file before any tensor is
    allocated (:mod:`fedlowrank.tensorfile`)."""
    from .tensorfile import TensorFileError, load_checked

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return load_checked(path)
    except TensorFileError as e:
        raise CheckpointError(f"corrupted or truncated safetensors file: {e}") from None


def load_torch_state(path: Path) -> dict:
    """Optimizer/RNG state saved with ``torch.save``, loaded with ``weights_only=True`` (no code runs)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for forbidden globals, RuntimeError/EOFError for truncation
        raise CheckpointError(f"{path}: refused or corrupted ({type(e).__name__}: {str(e)[:300]})") from e
