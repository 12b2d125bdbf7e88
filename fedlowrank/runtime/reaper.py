"""Watchdog that kills a simulation's Ray processes when the process that started them dies.

Ray's raylet and GCS share the driver's fate, but its agents (dashboard, runtime env) and
workers (re-parented to init at once) can linger for a minute after a SIGKILL of the driver.
This script runs in its own session (``python reaper.py <pid>``, no package imports) and, once
``pid`` is gone, kills the Ray processes of ``pid``'s process group that started after it (so
the shell or pytest that shares the group is never hit). Given ``roots`` (``python reaper.py <pid>
<root> ...``), it also stops each root's process tree (a private SuperLink, and the SuperExec, simulation
and Ray processes it started in sessions of their own): SIGTERM to the root's group, then SIGKILL to what
is left of the tree. :func:`start` / :func:`stop` wrap it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

RAY_MARKERS = ("ray::", "/ray/", "raylet", "gcs_server")


def _fields(pid: int) -> tuple[str, int, int, int] | None:
    """(state, parent, process group, start time in clock ticks) from ``/proc/<pid>/stat``, or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    f = raw[raw.rindex(")") + 2:].split()
    return f[0], int(f[1]), int(f[2]), int(f[19])


def _stat(pid: int) -> tuple[int, int] | None:
    """(process group, start time in clock ticks) of a live, non-zombie process."""
    f = _fields(pid)
    return None if f is None or f[0] == "Z" else (f[2], f[3])


def _same(pid: int, started: int) -> bool:
    """``pid`` is still the live process that started at ``started`` (not gone, not a reused pid)."""
    st = _stat(pid)
    return st is not None and st[1] == started


def _now_ticks() -> int:
    """Time since boot in the clock ticks of /proc/<pid>/stat's start time."""
    return int(float(Path("/proc/uptime").read_text().split()[0]) * os.sysconf("SC_CLK_TCK"))


def _ray_processes(pgid: int, after: int, before: int) -> list[int]:
    """Ray processes of group ``pgid`` started between ``after`` and ``before`` (clock ticks)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or (st := _stat(int(d.name))) is None or st[0] != pgid or not after <= st[1] <= before:
            continue
        if any(m in cmdline(int(d.name)) for m in RAY_MARKERS):
            out.append(int(d.name))
    return out


def group_alive(pgid: int) -> bool:
    """Some process of group ``pgid`` is still there."""
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def cmdline(pid: int) -> str:
    """The command line of ``pid`` ('' once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def tree(root: int) -> list[tuple[int, int]]:
    """(pid, start time) of ``root`` and all its live (non-zombie) descendants, from one pass over /proc."""
    procs = {int(d.name): f for d in Path("/proc").iterdir() if d.name.isdigit() and (f := _fields(int(d.name)))}
    children: dict[int, list[int]] = {}
    for pid, (_, ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        if p in procs and procs[p][0] != "Z":
            out.append((p, procs[p][3]))
        todo.extend(children.get(p, []))
    return out


def stop_trees(roots: list[int], grace: float = 10.0, spare: frozenset[int] = frozenset()) -> int:
    """SIGTERM the process group of each root (each leads its own group), then SIGKILL whatever outlives
    ``grace`` of their trees, of the roots' groups (also when a root itself is gone) and of the groups the
    trees had (a SuperExec's session keeps its Ray processes when their parent dies and they are re-parented
    away from the tree). The caller's own group and ``spare`` are never signalled. Returns how many
    processes of the trees had to be killed."""
    procs = [pt for r in roots for pt in tree(r)]
    spare = spare | {os.getpgrp()}
    groups = ({*roots} | {st[0] for p, _ in procs if (st := _stat(p)) is not None}) - spare
    for r in roots:
        if r in spare:
            continue
        try:
            os.killpg(r, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.time() + grace
    while time.time() < deadline and any(_same(p, t) for p, t in procs):
        time.sleep(0.2)
    killed = 0
    for p, t in procs:
        if _same(p, t):
            try:
                os.kill(p, signal.SIGKILL)
                killed += 1
            except OSError:
                pass
    for g in groups:
        try:
            os.killpg(g, signal.SIGKILL)
        except OSError:
            pass
    return killed


def watch(pid: int, interval: float = 0.5, roots: tuple[int, ...] = ()) -> int:
    """Wait for ``pid`` to end, then stop the trees of ``roots`` and kill its group's Ray processes;
    returns how many processes were killed."""
    st = _stat(pid)
    if st is None:
        return 0
    pgid, started = st
    while _stat(pid) is not None:
        time.sleep(interval)
    died = _now_ticks() + 1  # a run started after this moment (e.g. a resume) is never touched
    killed = stop_trees(list(roots), spare=frozenset({pgid}))
    for _ in range(3):  # workers may still be forking while the first ones go
        for child in _ray_processes(pgid, started, died):
            try:
                os.kill(child, signal.SIGKILL)
                killed += 1
            except OSError:
                pass
        time.sleep(interval)
    return killed


def start(roots: tuple[int, ...] = ()) -> subprocess.Popen | None:
    """Watch the current process (Linux only), and stop the process trees of ``roots`` when it dies;
    returns the watchdog, or None where /proc is missing."""
    if not Path("/proc/self/stat").exists():
        return None
    return subprocess.Popen([sys.executable, __file__, str(os.getpid()), *map(str, roots)], start_new_session=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(proc: subprocess.Popen | None) -> None:
    """The run ended normally (Ray shut down by Flower): retire the watchdog without killing anything."""
    if proc is not None:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    watch(int(sys.argv[1]), roots=tuple(int(a) for a in sys.argv[2:]))
