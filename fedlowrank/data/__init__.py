"""Datasets (embedded offline defaults first) and federated partitioning."""
