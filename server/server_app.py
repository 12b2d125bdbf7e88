"""Flower ServerApp shim for ``flwr run`` (``serverapp`` in pyproject.toml); the app is built by the library."""
from fedlowrank.federated.apps import server_app

app = server_app()
