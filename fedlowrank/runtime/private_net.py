"""A private network for a federated run: a new user and network namespace (Linux, no root needed) whose only
interface is its own loopback.

Both runtimes open unauthenticated endpoints on 127.0.0.1: the SuperLink's Control API (``flwr run`` submits an
app, i.e. runs code as the user) and Ray's GCS (runs tasks). Flower 1.41 offers no client authentication for a
local SuperLink (TLS there is server-side only; account authentication needs its OIDC plugin), so the run is
moved where no other process can connect: ``python private_net.py CMD...`` (no package imports: the process
must still be single-threaded) enters a fresh
user+network namespace (the user mapped to itself), brings its loopback up and execs ``CMD``; every process
``CMD`` starts shares that namespace, and nothing outside it (another user, another process of this user) can
reach its ports. It has no other network: data must be on disk before (``check_partitions`` loads it first).
The wrapped command gets SIGTERM when its parent dies.

``fed.isolation``: ``auto`` (default) uses it where the kernel allows unprivileged user namespaces and warns
where it does not; ``netns`` requires it (exit 2 where unavailable); ``none`` runs on the shared loopback.
"""
from __future__ import annotations

import ctypes
import os
import signal
import struct
import subprocess
import sys

CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
PR_SET_PDEATHSIG = 1


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _write(path: str, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)


def _loopback_up() -> None:
    """``ip link set lo up`` with one ioctl (needs CAP_NET_ADMIN in the new namespace, which its creator has)."""
    import fcntl
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH14s", b"lo", 0, b"")
        flags = struct.unpack("16sH14s", fcntl.ioctl(s, SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14s", b"lo", flags | IFF_UP, b""))


def enter() -> None:
    """Move this (single-threaded) process into a new user+network namespace with loopback up; OSError where the
    kernel refuses (unprivileged user namespaces disabled, seccomp, not Linux)."""
    if not sys.platform.startswith("linux"):
        raise OSError("network namespaces need Linux")
    uid, gid = os.getuid(), os.getgid()
    libc = _libc()
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWUSER|CLONE_NEWNET): {os.strerror(err)}")
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} {uid} 1")
    _write("/proc/self/gid_map", f"{gid} {gid} 1")
    _loopback_up()


def command(args: list[str]) -> list[str]:
    """``args`` run inside a private network (see the module docstring)."""
    return [sys.executable, os.path.abspath(__file__), *args]


def unavailable() -> str | None:
    """Why a private network cannot be made here (None when it can): tried once in a throwaway child."""
    probe = command([sys.executable, "-c", "import socket; socket.create_server(('127.0.0.1', 0)).close()"])
    try:
        r = subprocess.run(probe, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    return None if r.returncode == 0 else (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit("usage: python private_net.py CMD [ARG...]")
    _libc().prctl(PR_SET_PDEATHSIG, signal.SIGTERM)  # kept across exec: the run dies with main.py
    try:
        enter()
    except OSError as e:
        sys.exit(f"private_net: cannot make a private network namespace: {e}")
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
