"""Federated training: aggregation math, client logic and the simulation runner."""
