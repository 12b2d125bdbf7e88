"""The first process inside a run's private network (:mod:`.private_net`), started by :func:`.runner.run_isolated`:
it runs the run and writes its outcome as JSON (``{"results": ...}`` or the error and its kind) for ``main.py``,
which relays its log and raises the error again.

``python -m fedlowrank.runtime.isolated superlink <spec.json> <result.json>``: the default runtime; this process only
starts the SuperLink and ``flwr run`` and waits (:func:`.superlink.launch`), so it imports no torch and stays small
(about 300 MB less than a process that validates the run, which ``main.py`` did already).
``python -m fedlowrank.runtime.isolated runner <config.yaml> <result.json>``: any other runtime, validated and run
here (``fed.runtime=simulation`` runs the apps in this process)."""
from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from fedlowrank import stopping as stop

from .logs import log_to_stderr

log = logging.getLogger(__name__)


def report(job: Callable[[], dict], result: str) -> None:
    """Run ``job`` and write its outcome to ``result``; exit 1 on an error, 0 otherwise."""
    log_to_stderr("fedlowrank")
    logging.getLogger("flwr").propagate = False
    stop.install()
    try:
        out = {"results": job()}
    except KeyboardInterrupt as e:  # Ctrl-C or main.py's SIGTERM: stopped quietly, main.py says how to resume
        out = {"error": "stopped", "kind": "Stopped", "signum": stop.exit_code(e) - 128}
    except Exception as e:  # noqa: BLE001 - handed to main.py, which raises it again
        log.exception("federated run failed")
        out = {"error": str(e), "kind": type(e).__name__}
    Path(result).write_text(json.dumps(out))
    sys.exit(1 if "error" in out else 0)


def main(argv: list[str]) -> None:
    kind, arg, result = argv
    if kind == "superlink":
        from .superlink import launch

        report(lambda: launch(json.loads(Path(arg).read_text())), result)
        return
    from omegaconf import OmegaConf

    from fedlowrank.config import federated_run_from_cfg

    from .runner import run_runtime

    cfg = OmegaConf.load(arg)
    report(lambda: run_runtime(federated_run_from_cfg(cfg), cfg), result)


if __name__ == "__main__":
    main(sys.argv[1:])
