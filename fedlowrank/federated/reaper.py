"""Watchdog that kills a simulation's Ray processes when the process that started them dies.

Ray's raylet and GCS share the driver's fate, but its agents (dashboard, runtime env) and
workers (re-parented to init at once) can linger for a minute after a SIGKILL of the driver.
This script runs in its own session (``python reaper.py <pid>``, no package imports) and, once
``pid`` is gone, kills the Ray processes of ``pid``'s process group that started after it (so
the shell or pytest that shares the group is never hit). :func:`start` / :func:`stop` wrap it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

RAY_MARKERS = ("ray::", "/ray/", "raylet", "gcs_server")


def _stat(pid: int) -> tuple[int, int] | None:
    """(process group, start time in clock ticks) of a live, non-zombie process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    if fields[0] == "Z":
        return None
    return int(fields[2]), int(fields[19])


def _now_ticks() -> int:
    """Time since boot in the clock ticks of /proc/<pid>/stat's start time."""
    return int(float(Path("/proc/uptime").read_text().split()[0]) * os.sysconf("SC_CLK_TCK"))


def _ray_processes(pgid: int, after: int, before: int) -> list[int]:
    """Ray processes of group ``pgid`` started between ``after`` and ``before`` (clock ticks)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or (st := _stat(int(d.name))) is None or st[0] != pgid or not after <= st[1] <= before:
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(m in cmd for m in RAY_MARKERS):
            out.append(int(d.name))
    return out


def watch(pid: int, interval: float = 0.5) -> int:
    """Wait for ``pid`` to end, then kill its group's Ray processes; returns how many were killed."""
    st = _stat(pid)
    if st is None:
        return 0
    pgid, started = st
    while _stat(pid) is not None:
        time.sleep(interval)
    died = _now_ticks() + 1  # a run started after this moment (e.g. a resume) is never touched
    killed = 0
    for _ in range(3):  # workers may still be forking while the first ones go
        for child in _ray_processes(pgid, started, died):
            try:
                os.kill(child, signal.SIGKILL)
                killed += 1
            except OSError:
                pass
        time.sleep(interval)
    return killed


def start() -> subprocess.Popen | None:
    """Watch the current process (Linux only); returns the watchdog, or None where /proc is missing."""
    if not Path("/proc/self/stat").exists():
        return None
    return subprocess.Popen([sys.executable, __file__, str(os.getpid())], start_new_session=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(proc: subprocess.Popen | None) -> None:
    """The run ended normally (Ray shut down by Flower): retire the watchdog without killing anything."""
    if proc is not None:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
