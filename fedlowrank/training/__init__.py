"""Training loops, schedulers and optimizer utilities."""
