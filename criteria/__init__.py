"""prune-cli's built-in criteria. Importing the package registers each one (a plain list of imports)."""

from criteria import dcs, l1  # noqa: F401
