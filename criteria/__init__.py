"""prune-cli's built-in criteria: one module (or, for a large one, one package) per criterion. Importing this
package imports each of them, and each registers itself: a new criterion is found without editing another file."""

import importlib
import pkgutil

for _found in pkgutil.iter_modules(__path__):
    if not _found.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_found.name}")
