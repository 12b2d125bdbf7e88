"""A warm SuperExec for deployed SuperNodes: one long-lived process per node that has already imported
torch and fedlowrank, and forks one child per ClientApp message.

Flower 1.41's SuperNode (``--isolation subprocess``) starts ``flower-superexec``, which starts a fresh
``flwr-clientapp`` process for every message; each re-imports torch and the library, which is most of a
deployed round on a small machine. With ``--isolation process`` the SuperNode leaves task execution to a
process started beside it; this module is that process. It runs Flower's own SuperExec loop
(``run_superexec``: acquire a task and its token from the node's Runtime API) with an executor that
``fork()``s instead of ``exec``-ing: the child runs Flower's unmodified ``run_clientapp`` for that token
(pull the message, load the ClientApp from the installed FAB, train, push the reply) and exits. Nothing is
shared between messages except the imported modules (copy-on-write); every message still runs in its
own process, so one client's state never leaks into the next. Non-ClientApp tasks go to Flower's
``SubprocessExecutor``. POSIX only (``fork``).

    flower-supernode --insecure --superlink HOST:9092 --isolation process --port 9094
    python -m fedlowrank.deploy.warmexec --insecure --runtime-api-address 127.0.0.1:9094
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import time
import traceback
from unittest import mock

from .fastnode import retry_pulls_sooner

log = logging.getLogger(__name__)

# torch._dynamo: torch.optim imports it lazily on the first optimizer (2-3 s); hydra: the run config is
# composed per message (deploy.run_from_run_config)
PRELOAD = ("torch", "torch._dynamo", "torch.optim", "hydra", "omegaconf", "fedlowrank.federated.run_config",
           "fedlowrank.federated.client", "fedlowrank.federated.task", "fedlowrank.deploy.cache",
           "flwr.supernode.runtime.run_clientapp", "flwr.clientapp")
POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # Flower's own knob for the SuperExec poll (default 1 s)


def reuse_installed_fab(rc) -> bool:
    """Make ``rc.install_from_fab`` return the installed app directory of an already installed FAB at once.
    Flower's version unzips and hash-checks the whole FAB into a temporary directory for every message
    (0.1-0.2 s here) and then, finding the app directory of that hash installed, returns it anyway.
    Returns False (nothing patched) where this Flower lacks what the shortcut needs."""
    import hashlib

    try:
        from flwr.common.constant import APP_DIR, FAB_HASH_TRUNCATION
        from flwr.supercore.utils import get_flwr_home
    except ImportError:
        return False
    install = getattr(rc, "install_from_fab", None)
    if install is None:
        return False

    def installed_or_install(fab_file, install_dir=None, skip_prompt: bool = False):
        if isinstance(fab_file, bytes) and install_dir is None and skip_prompt:
            tag = hashlib.sha256(fab_file).hexdigest()[:FAB_HASH_TRUNCATION]
            found = [p for p in (get_flwr_home() / APP_DIR).glob(f"*.{tag}") if (p / "pyproject.toml").is_file()]
            if len(found) == 1:
                return found[0]
        return install(fab_file, install_dir, skip_prompt)

    rc.install_from_fab = installed_or_install
    return True


def _child(spec, pull_backoff_s: float | None = None) -> int:
    """Body of a forked child: Flower's ``run_clientapp`` for this token; returns the exit code.
    ``pull_backoff_s``: first retry delay when the message's objects are not at the node yet (Flower: 1 s,
    doubling; a child forked at once often asks while the node is still receiving the model)."""
    import flwr.supernode.runtime.run_clientapp as rc

    if pull_backoff_s and not retry_pulls_sooner(rc, "pull_and_inflate_object_from_tree", pull_backoff_s):
        log.warning("this Flower version's run_clientapp has no pull_and_inflate_object_from_tree: "
                    "keeping its own object-pull backoff")

    if not reuse_installed_fab(rc):
        log.warning("this Flower version's run_clientapp has no install_from_fab: every message unpacks the FAB")
    for s in (signal.SIGINT, signal.SIGTERM):  # drop the parent's SuperExec handlers
        signal.signal(s, signal.SIG_DFL)
    certs = None
    if not spec.insecure and spec.root_certificates_path:
        with open(spec.root_certificates_path, "rb") as fh:
            certs = fh.read()
    t0 = time.perf_counter()
    try:
        rc.run_clientapp(runtime_api_address=spec.runtime_api_address, token=spec.token, insecure=spec.insecure,
                         certificates=certs, parent_pid=None,
                         runtime_dependency_install=spec.runtime_dependency_install)
    except SystemExit as e:  # flwr_exit
        log.info("task %d: ClientApp child finished in %.2f s (exit %s)", spec.task_id, time.perf_counter() - t0,
                 e.code)
        return e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - the child must never return into the parent's loop
        traceback.print_exc()
        return 1
    return 0


class ForkExecutor:
    """Flower ``Executor`` (``flwr.supercore.superexec.executor.types.Executor``) that forks ClientApp
    tasks from this warm process; other task types go to Flower's subprocess executor."""

    def __init__(self, pull_backoff_s: float | None = 0.05) -> None:
        from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

        self.pull_backoff_s = pull_backoff_s
        self.fallback = SubprocessExecutor()
        self.children: set[int] = set()

    def get_eligible_capacity(self, supported_task_types, *, insecure: bool = False,
                              root_certificates_path: str | None = None):
        return supported_task_types, set()

    def wait_for_capacity(self, task_type=None, *, fab_hash=None, insecure: bool = False,
                          root_certificates_path: str | None = None) -> None:
        return None

    def launch(self, spec):
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor.types import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            return self.fallback.launch(spec)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # child: never returns
            code = 1
            try:
                code = _child(spec, self.pull_backoff_s)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.children.add(pid)
        log.info("task %d: forked ClientApp child %d", spec.task_id, pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished children (no zombies)."""
        for pid in list(self.children):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done:
                self.children.discard(pid)
                if code := os.waitstatus_to_exitcode(status):
                    log.warning("ClientApp child %d exited with %d", pid, code)

    def close(self) -> None:
        """Stop children still running (the node is going away) and reap them."""
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGTERM)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        self.children.clear()


def serve(runtime_api_address: str, insecure: bool, root_certificates: str | None = None,
          parent_pid: int | None = None, preload: tuple[str, ...] = PRELOAD,
          pull_backoff_s: float | None = 0.05) -> None:
    """Import ``preload``, then run Flower's SuperExec loop with :class:`ForkExecutor` (never returns)."""
    if not hasattr(os, "fork"):
        raise SystemExit("fedlowrank.deploy.warmexec needs fork() (Linux/macOS); use --isolation subprocess")
    for name in preload:
        importlib.import_module(name)
    os.environ.setdefault(POLL_ENV, "0.1")
    from flwr.supercore.superexec import run_superexec as rs

    if not hasattr(rs, "get_executor"):
        raise SystemExit(f"this Flower version ({rs.__name__}) has no pluggable executor; "
                         "use flower-supernode --isolation subprocess")
    with mock.patch.object(rs, "get_executor", lambda *a, **k: ForkExecutor(pull_backoff_s)):
        rs.run_superexec(runtime_api_address=runtime_api_address, insecure=insecure,
                         root_certificates_path=root_certificates, parent_pid=parent_pid)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API (host:port)")
    ap.add_argument("--insecure", action="store_true")
    ap.add_argument("--root-certificates", default=None)
    ap.add_argument("--parent-pid", type=int, default=None, help="exit when this process (the SuperNode) exits")
    ap.add_argument("--pull-backoff", type=float, default=0.05,
                    help="first retry delay (s) for a message's objects in a child (Flower: 1 s); 0 keeps Flower's")
    ap.add_argument("--preload", nargs="*", default=list(PRELOAD), help="modules imported once, before forking")
    args = ap.parse_args(argv)
    if not args.insecure and not args.root_certificates:
        ap.error("give --root-certificates, or --insecure for a loopback/test deployment")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Runtime API poll otherwise
    serve(args.runtime_api_address, args.insecure, args.root_certificates, args.parent_pid, tuple(args.preload),
          args.pull_backoff or None)


if __name__ == "__main__":
    main()
