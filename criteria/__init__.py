"""prune-cli's built-in criteria. Importing the package registers each one (a plain list of imports)."""

from criteria import dcs, haste, l1, lasso, manidp, sensitivity, similarity  # noqa: F401
