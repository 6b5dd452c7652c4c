"""prune-cli's built-in criteria. Importing the package registers each one (a plain list of imports)."""

from criteria import dcs, haste, l1, manidp, sensitivity  # noqa: F401
from criteria import lasso, similarity  # noqa: F401
