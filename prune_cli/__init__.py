"""prune-cli: compare channel-importance criteria for CNN pruning on physically pruned models."""

__version__ = "0.1.0"
