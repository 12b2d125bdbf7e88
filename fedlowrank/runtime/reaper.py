"""Watchdog that stops what a run started when the process that started it dies, and nothing else.

Ray's raylet and GCS share the driver's fate, but its agents (dashboard, runtime env) and workers (re-parented
to init at once) can linger for a minute after a SIGKILL of the driver. This script runs in its own session
(``python reaper.py <pid>:<start> [<root pid>:<start> ...]``, no package imports). While ``pid`` lives it records,
every ``interval``, the (pid, start time) of every descendant of ``pid`` and of each root (a private SuperLink,
whose SuperExec and simulation run in sessions of their own), and of the members of a root's process group while
that root is verifiably the process it was given. Once ``pid`` is gone it stops exactly those recorded processes
that are still the same process (same pid, same start time): SIGTERM, then SIGKILL after a grace period. Nothing
is ever selected by name or by process group alone, so neither an unrelated process in the same group nor a
reused pid is touched. :func:`start` / :func:`stop` wrap it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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


def identity(pid: int) -> tuple[int, int] | None:
    """(pid, start time) of a process, zombies included (an unreaped child still owns its pid and group)."""
    f = _fields(pid)
    return None if f is None else (pid, f[3])


def _snapshot() -> dict[int, tuple[str, int, int, int]]:
    return {int(d.name): f for d in Path("/proc").iterdir() if d.name.isdigit() and (f := _fields(int(d.name)))}


def owned(pid: tuple[int, int], roots: tuple[tuple[int, int], ...]) -> set[tuple[int, int]]:
    """(pid, start) of every live process that ``pid`` or a root owns, from one pass over /proc: their
    descendants, and the members of every group led by one of those processes while its leader is verifiably
    itself (a SuperExec's session keeps Ray processes whose parent died). ``pid``'s own group is never expanded
    (a shell puts unrelated processes, e.g. ``| tee``, into it); ``pid`` itself is left out."""
    procs = _snapshot()
    children: dict[int, list[int]] = {}
    members: dict[int, list[int]] = {}
    for p, (_, ppid, pgid, _) in procs.items():
        children.setdefault(ppid, []).append(p)
        members.setdefault(pgid, []).append(p)
    out: set[tuple[int, int]] = set()
    seen: set[int] = set()
    todo = [r for r, t in (pid, *roots) if r in procs and procs[r][3] == t]  # zombies too: unreaped, still ours
    while todo:
        p = todo.pop()
        if p not in procs or p in seen:
            continue
        seen.add(p)
        if procs[p][0] != "Z":
            out.add((p, procs[p][3]))
        todo.extend(children.get(p, []))
        if procs[p][2] == p and p != pid[0]:  # p leads its group: the group is p's
            todo.extend(members.get(p, []))
    return out - {pid}


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
    procs = _snapshot()
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


def stop_trees(roots: list[int], grace: float = 10.0) -> int:
    """Stop what ``roots`` own (see :func:`owned`; the roots included): SIGTERM, then SIGKILL after ``grace``.
    ``roots`` must be this process's own unreaped children (``Popen`` objects not yet waited): their pids, and so
    their groups, cannot have been reused. A root already reaped is skipped. Returns how many needed SIGKILL."""
    idents = tuple(i for r in roots if (i := identity(r)) is not None)
    return kill_known(owned((0, 0), idents), grace)  # owned() includes the live roots themselves


def end_tree(root: subprocess.Popen, grace: float = 1.0) -> int:
    """End a finished run's process tree without its own shutdown: what ``root`` (a child of this process, not
    reaped yet) owns is recorded first, then ``root`` is killed at once (its handlers would only start the
    shutdown this skips) and reaped, and the rest get SIGTERM, then SIGKILL after ``grace``. Returns how many of
    the rest needed SIGKILL."""
    ident = identity(root.pid) if root.returncode is None else None
    known = owned((0, 0), (ident,)) - {ident} if ident is not None else set()
    root.kill()
    root.wait()
    return kill_known(known, grace)


def kill_known(known: set[tuple[int, int]], grace: float = 10.0) -> int:
    """SIGTERM every process of ``known`` that is still itself, then SIGKILL those that outlive ``grace``;
    returns how many needed SIGKILL."""
    spare = {os.getpid()}
    live = [k for k in known if k[0] not in spare and _same(*k)]
    for p, _ in live:
        try:
            os.kill(p, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.time() + grace
    while time.time() < deadline and any(_same(*k) for k in live):
        time.sleep(0.2)
    killed = 0
    for p, t in live:
        if _same(p, t):
            try:
                os.kill(p, signal.SIGKILL)
                killed += 1
            except OSError:
                pass
    return killed


def watch(pid: tuple[int, int], interval: float = 0.5, roots: tuple[tuple[int, int], ...] = (),
          grace: float = 5.0) -> int:
    """Record what ``pid`` and ``roots`` own while ``pid`` lives; then stop it (see the module docstring).
    Returns how many processes needed SIGKILL."""
    known: set[tuple[int, int]] = set()
    while _same(*pid):  # alive, not a zombie, not a reused pid
        known |= owned(pid, roots)
        time.sleep(interval)
    known |= owned(pid, roots)  # what the roots still hold
    killed = 0
    for _ in range(3):  # workers may still be forking while the first ones go
        killed += kill_known(known, grace)
        more = owned(pid, roots) - known
        if not more:
            break
        known |= more
    return killed


def start(roots: tuple[int, ...] = ()) -> subprocess.Popen | None:
    """Watch the current process (Linux only), and stop what it and ``roots`` (pids of this process's own,
    unreaped children) own when it dies; returns the watchdog, or None where /proc is missing."""
    me = identity(os.getpid())
    idents = [identity(r) for r in roots]
    if me is None:
        return None
    args = [f"{p}:{t}" for p, t in (me, *[i for i in idents if i is not None])]
    return subprocess.Popen([sys.executable, __file__, *args], start_new_session=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def terminate(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop one child process: SIGTERM, SIGKILL if it is still there after ``grace`` seconds; then reap it."""
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def stop(proc: subprocess.Popen | None) -> None:
    """The run ended normally (Ray shut down by Flower): retire the watchdog without killing anything."""
    if proc is not None:
        proc.terminate()
        proc.wait(timeout=10)


def _parse(arg: str) -> tuple[int, int]:
    p, t = arg.split(":")
    return int(p), int(t)


if __name__ == "__main__":
    watch(_parse(sys.argv[1]), roots=tuple(_parse(a) for a in sys.argv[2:]))
