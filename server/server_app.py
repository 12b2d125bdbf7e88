"""Flower ServerApp (thin): configuration in, :func:`run_server` does the work.

Simulation builds it with :func:`make_server_app` (config via closure); ``flwr run``
uses the module-level ``app``, reading Hydra overrides from the run config key ``overrides``.
"""
from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlowrank.config import FederatedRun
from fedlowrank.federated.server import run_server


def make_server_app(run: FederatedRun, results: dict | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            summary = run_server(grid, run)
        except Exception as e:  # the simulation engine only logs ServerApp errors: hand the cause back
            if results is not None:
                results["error"] = f"{type(e).__name__}: {e}"
            raise
        if results is not None:
            results.update(summary)

    return app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from fedlowrank.federated.deploy import run_from_run_config

    run_server(grid, run_from_run_config(context.run_config))
