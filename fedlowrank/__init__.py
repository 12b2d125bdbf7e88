"""fedlowrank: low-rank training, centralized and federated."""
__version__ = "0.1.0"
