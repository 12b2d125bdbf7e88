"""Log hygiene and forwarding for Flower's runtimes.

* In the process that runs the ServerApp (``flwr-simulation`` under a SuperLink), Flower mirrors stdout and
  stderr into the run's log stream, but nothing prints the project's own records: :func:`log_to_stderr`
  gives the ``fedlowrank`` logger a stderr handler there.
* ``main.py`` reads ``flwr run --stream`` and :func:`relay_stream` re-logs each line through ``logging``, so
  the round lines reach the console and ``<out_dir>/main.log``; lines known to be noise are dropped
  (:class:`StreamRelay`).
* When a ClientApp raises, flwr 1.41's simulation engine logs the exception, its whole traceback and "An
  exception was raised when processing a message by RayBackend" (~80 lines per failure). The strategy logs
  each failure's cause in one line and writes the traceback to ``client_failures.log``, so those engine
  records are dropped (:class:`EngineTracebackFilter`).
"""
from __future__ import annotations

import logging
import os
import re
import sys
import threading
from collections.abc import Iterable

# (file, function) of the engine's per-message error records in flwr 1.41
ENGINE_SITES = (("fleet/vce/vce_api.py", "worker"), ("fleet/vce/backend/raybackend.py", "process_message"))
# Flower's level prefix in streamed lines, e.g. "INFO :      text" (colour codes stripped first)
_FLOWER = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*:\s*(.*)$")
# the project's own records as :func:`log_to_stderr` prints them
_OURS = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) (fedlowrank[\w.]*): (.*)$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Flower's lines that tell a main.py user nothing (flwr 1.41): the federation-size hint
# (it names no command), the strategy's start-up tree and its raw metric dumps (the project logs each round's
# numbers itself, rounded), Ray's FutureWarnings and its actors' shutdown notices.
NOISE = (
    "Federation `", "flwr federation simulation-config",
    "To change federation size", "default simulated SuperNodes", "Starting logstream", "Successfully started run",
    "FutureWarning", "warnings.warn(", "Starting HeteroRankStrategy strategy", "├──", "└──>", "Global evaluation",
    "Initial global evaluation results", "Loading project configuration",
    "Manually terminating ClientAppActor", "Strategy execution finished",
    "[ROUND ",  # Flower's round banner: the project's own line ("round k/n: accuracy ...") marks each round
    # the tail of run_simulation's deprecation notice (see NOT_APPLICABLE), and Ray in a private network, which by
    # design has no route out: it then resolves its address by hostname, as it says
    "This is a deprecated feature. It will be removed", "entirely in future versions of Flower.",
    "Failed to determine local IP via external connectivity",
)
# Flower's warnings that never apply to a run of this project: flwr 1.41 says the default federation size changed
# on every simulation start, though the runtime always sets num-supernodes itself; and with fed.runtime=simulation
# that run_simulation is deprecated (the user chose it; the run's first line and docs/federated.md say so, and the
# default runtime is the `flwr run` Flower points to). Other warnings always show.
NOT_APPLICABLE = ("default simulated SuperNodes changed", "The `run_simulation` function is deprecated")
# Flower's closing dump of every round's metrics in scientific notation: dropped up to the next line of ours
FINAL_BLOCK = "Final results:"
# The last line of a finished run's summary (``federated.report.summary_lines``), logged by the server's logger:
# once it has been relayed the user has seen everything, and the SuperLink runtime stops Flower's shutdown short
SUMMARY_END = ("fedlowrank.federated.server", "tensorboard --logdir ")


class EngineTracebackFilter(logging.Filter):
    """Drops ERROR records logged by the simulation engine for a failed ClientApp message."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        path = record.pathname.replace(os.sep, "/")
        return not any(path.endswith(f) and record.funcName == fn for f, fn in ENGINE_SITES)


def _install_once(cls: type[logging.Filter], logger: logging.Logger | None) -> None:
    """Add a ``cls`` filter to ``logger`` (Flower's by default) unless it has one already."""
    logger = logger or logging.getLogger("flwr")
    if not any(isinstance(f, cls) for f in logger.filters):
        logger.addFilter(cls())


def quiet_engine_tracebacks(logger: logging.Logger | None = None) -> None:
    """Install :class:`EngineTracebackFilter` on Flower's logger (once) in this process."""
    _install_once(EngineTracebackFilter, logger)


def log_to_stderr(name: str = "fedlowrank") -> None:
    """Give logger ``name`` an INFO stderr handler (once) where nothing else handles its records: in the
    ServerApp process of a SuperLink run, whose stderr Flower streams to ``flwr run --stream``."""
    logger = logging.getLogger(name)
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


class FlowerNoise:
    """Decides, line by line, which of Flower's lines a main.py user sees: not :data:`NOISE`, not empty, and
    nothing of Flower's closing metrics dump (:data:`FINAL_BLOCK` up to the next line of the project's)."""

    def __init__(self) -> None:
        self.in_final_block = False

    def ours(self) -> None:
        """A line of the project's own came: Flower's closing dump is over."""
        self.in_final_block = False

    def keep(self, msg: str) -> bool:
        if msg.startswith(FINAL_BLOCK):
            self.in_final_block = True
        return bool(msg) and not self.in_final_block and not any(n in msg for n in NOISE)


class FlowerNoiseFilter(logging.Filter):
    """The same decision for records of Flower's own logger (the in-process ``run_simulation`` runtime)."""

    def __init__(self) -> None:
        super().__init__()
        self.noise = FlowerNoise()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage().strip()
        if record.levelno >= logging.WARNING:
            return not any(n in msg for n in NOT_APPLICABLE)
        return self.noise.keep(msg)


def quiet_flower(logger: logging.Logger | None = None) -> None:
    """Install :class:`FlowerNoiseFilter` on Flower's logger (once) in this process."""
    _install_once(FlowerNoiseFilter, logger)


class StreamRelay:
    """Re-logs the lines of ``flwr run --stream``: the project's records under their own logger names and
    levels, Flower's under ``fedlowrank.flwr`` at theirs, those :class:`FlowerNoise` keeps. ``summary_done`` is
    set once the run summary's last line (:data:`SUMMARY_END`) has been re-logged."""

    def __init__(self, flower_logger: logging.Logger | None = None) -> None:
        self.flower = flower_logger or logging.getLogger("fedlowrank.flwr")
        self.noise = FlowerNoise()
        self.summary_done = threading.Event()

    def __call__(self, line: str) -> None:
        text = _ANSI.sub("", line).strip()
        ours = _OURS.match(text)
        if ours:
            self.noise.ours()
            logging.getLogger(ours.group(2)).log(getattr(logging, ours.group(1)), "%s", ours.group(3))
            if ours.group(2) == SUMMARY_END[0] and ours.group(3).lstrip().startswith(SUMMARY_END[1]):
                self.summary_done.set()
            return
        m = _FLOWER.match(text)
        level, msg = (getattr(logging, m.group(1)), m.group(2).strip()) if m else (logging.INFO, text)
        keep = (bool(msg) and not any(n in msg for n in NOT_APPLICABLE) if level >= logging.WARNING
                else self.noise.keep(msg))  # as FlowerNoiseFilter: every warning but those that never apply
        if keep:
            self.flower.log(level, "%s", msg)


def relay_stream(lines: Iterable[str], logger: logging.Logger | None = None,
                 relay: StreamRelay | None = None) -> threading.Thread:
    """A daemon thread that relays every line of ``lines`` (a subprocess's text stdout) through ``relay`` (a new
    :class:`StreamRelay` by default); join it once the process has ended."""
    relay = relay or StreamRelay(logger)

    def pump() -> None:
        for line in lines:
            relay(line)

    thread = threading.Thread(target=pump, name="flwr-run-relay", daemon=True)
    thread.start()
    return thread
