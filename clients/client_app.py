"""Flower ClientApp shim for ``flwr run`` (``clientapp`` in pyproject.toml); the app is built by the library."""
from fedlowrank.federated.apps import client_app

app = client_app()
