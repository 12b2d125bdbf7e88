"""Log hygiene for the Flower simulation engine.

When a ClientApp raises, flwr 1.41's simulation engine logs the exception, its whole traceback and
"An exception was raised when processing a message by RayBackend" (~80 lines per failure), then hands
the server an Error reply. The strategy already logs each failure's cause in one line and writes the
traceback to ``<out_dir>/client_failures.log``, so those engine records are dropped.
"""
from __future__ import annotations

import logging
import os

# (file, function) of the engine's per-message error records in flwr 1.41
ENGINE_SITES = (("fleet/vce/vce_api.py", "worker"), ("fleet/vce/backend/raybackend.py", "process_message"))


class EngineTracebackFilter(logging.Filter):
    """Drops ERROR records logged by the simulation engine for a failed ClientApp message."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        path = record.pathname.replace(os.sep, "/")
        return not any(path.endswith(f) and record.funcName == fn for f, fn in ENGINE_SITES)


def quiet_engine_tracebacks(logger: logging.Logger | None = None) -> None:
    """Install :class:`EngineTracebackFilter` on Flower's logger (once) in this process."""
    logger = logger or logging.getLogger("flwr")
    if not any(isinstance(f, EngineTracebackFilter) for f in logger.filters):
        logger.addFilter(EngineTracebackFilter())
