"""Stopping a run as a person expects: Ctrl-C (SIGINT) or SIGTERM ends it without a traceback, exit code
128 + the signal (130, 143), and the console says which checkpoints are kept and the exact command that resumes.
Checkpoints are atomic (a manifest written last), so whatever step or round the signal interrupts, the newest
complete checkpoint is intact and is what resumes. After the first signal, further SIGINT/SIGTERM are ignored while
the run stops what it started (bounded: the runtimes' own timeouts and watchdogs)."""
from __future__ import annotations

import contextlib
import shlex
import signal
import sys
import threading
from collections.abc import Iterator


class Stopped(KeyboardInterrupt):
    """The run was asked to stop by ``signum``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop(signum: int, frame) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Stopped(signum)


def install() -> None:
    """SIGINT and SIGTERM raise :class:`Stopped` in the main thread (no-op elsewhere: signals go to it)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _stop)
        signal.signal(signal.SIGTERM, _stop)


@contextlib.contextmanager
def deferred(enabled: bool = True) -> Iterator[list[int]]:
    """Within: SIGINT/SIGTERM only append their number to the yielded list (further ones are ignored); a loop
    checks it at its next safe point, e.g. after an optimizer step, checkpoints and raises :class:`Stopped`."""
    asked: list[int] = []
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield asked
        return

    def note(signum: int, frame) -> None:
        if not asked:
            asked.append(signum)

    before = signal.signal(signal.SIGINT, note), signal.signal(signal.SIGTERM, note)
    try:
        yield asked
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])


def exit_code(e: BaseException) -> int:
    return 128 + getattr(e, "signum", signal.SIGINT)


def resume_command(argv: list[str], out_dir: str, mode: str) -> str | None:
    """The command line that continues this run: the same overrides, its output directory, ``resume=auto``
    (None for modes that do not resume)."""
    key = {"federated": "fed.resume", "central": "trainer.resume"}.get(mode)
    if key is None:
        return None
    drop = ("out_dir", key)
    kept = [a for a in argv[1:] if a.split("=", 1)[0].lstrip("+") not in drop]
    python = sys.orig_argv[0] if getattr(sys, "orig_argv", None) else sys.executable
    return shlex.join([python, argv[0], *kept, f"out_dir={out_dir}", f"{key}=auto"])


__all__ = ["Stopped", "deferred", "exit_code", "install", "resume_command"]
