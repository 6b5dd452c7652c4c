"""prune-cli: compare channel-importance criteria for CNN pruning on physically pruned models.

Public helpers are imported lazily so that `prune-cli --help` does not pay for importing torch.
"""

__version__ = "0.1.0"
__all__ = ["load_model", "prune", "save_model", "__version__"]


def __getattr__(name: str):
    if name in ("load_model", "save_model"):
        from prune_cli.store import modelfile

        return getattr(modelfile, name)
    if name == "prune":
        from prune_cli.run.notebook import prune

        return prune
    raise AttributeError(f"module 'prune_cli' has no attribute {name!r}")
