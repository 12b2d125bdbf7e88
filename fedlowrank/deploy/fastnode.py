"""``flower-supernode`` with a shorter poll: ``python -m fedlowrank.deploy.fastnode [--poll-s S] -- <args>``.

Flower 1.41's SuperNode main loop sleeps a fixed 3 s whenever the SuperLink had no message for it, and
0.5 s while it waits for a ClientApp's reply, and it retries pulling a message's objects after 1 s, 2 s, ...
when the server has not finished pushing them; in a deployed round that is seconds of waiting per node
however small the training is. This entry point caps those sleeps at ``--poll-s`` (the only ``time.sleep``
calls in ``flwr.supernode.start_client_internal``, all polls), starts the object-pull backoff at
``--poll-s``, and then runs Flower's own ``flower_supernode`` with the remaining arguments, unchanged. The price is more frequent pulls against the
SuperLink (1 / poll-s per idle node): fine for a handful of nodes on a LAN or loopback, not for
thousands. Use it with ``--isolation process`` and :mod:`.warmexec`, or on its own.
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
from types import ModuleType


class _CappedSleep(ModuleType):
    """The ``time`` module, except that ``sleep`` waits at most ``cap`` seconds."""

    def __init__(self, cap: float) -> None:
        super().__init__("time")
        self.cap = cap

    def __getattr__(self, name: str):
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))


def retry_pulls_sooner(module: ModuleType, name: str, first_s: float) -> bool:
    """Rebind ``module.name`` (Flower's ``pull_objects`` / ``pull_and_inflate_object_from_tree``, whose object
    pulls retry after 1 s, 2 s, ...) to start retrying after ``first_s`` s, at most 1 s apart, in this
    process. False, and nothing changed, where the module has no such function."""
    if not callable(getattr(module, name, None)):
        return False
    setattr(module, name, functools.partial(getattr(module, name), initial_backoff=first_s, backoff_cap=1.0))
    return True


def cap_supernode_polls(poll_s: float) -> None:
    """Make the SuperNode loop poll every ``poll_s`` s (in this process)."""
    if not poll_s > 0:
        raise ValueError(f"--poll-s must be > 0, got {poll_s}")
    import flwr.supernode.start_client_internal as sci

    if getattr(sci, "time", None) is not time:
        raise SystemExit("this Flower version's SuperNode loop is not the one fastnode knows; "
                         "run flower-supernode instead")
    sci.time = _CappedSleep(poll_s)
    # the node pulls a message's objects from the SuperLink often while the server is still pushing them
    if not retry_pulls_sooner(sci, "pull_objects", poll_s):
        raise SystemExit("this Flower version's SuperNode has no pull_objects; run flower-supernode instead")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, theirs = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else ([], argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--poll-s", type=float, default=0.1, help="longest SuperNode poll sleep (Flower: 3 s idle)")
    args = ap.parse_args(ours)
    cap_supernode_polls(args.poll_s)
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *theirs]
    flower_supernode()


if __name__ == "__main__":
    main()
