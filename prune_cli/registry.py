"""One small registry: decorator registration, duplicates are errors, did-you-mean, lazy entry points.

Used for models, datasets and criteria. Third-party entries come from an entry-point group (for criteria:
`prune_cli.criteria`) and are loaded only when the name is not built in, or when everything is listed.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable, Iterator
from importlib import metadata
from typing import Generic, TypeVar

from prune_cli.errors import PruneCliError, UnknownName

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object. `kind` names the thing in messages ("model", "criterion")."""

    def __init__(self, kind: str, entry_point_group: str | None = None):
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._items: dict[str, T] = {}
        self._origins: dict[str, str] = {}
        self._entry_points_loaded = entry_point_group is None

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator: `@REG.register()` uses the object's `name` attribute or `__name__`."""

        def decorate(obj: T) -> T:
            self.add(name or getattr(obj, "name", None) or obj.__name__, obj)
            return obj

        return decorate

    def add(self, name: str, obj: T, origin: str | None = None) -> None:
        origin = origin or _origin(obj)
        if name in self._items:
            raise PruneCliError(
                f"duplicate {self.kind} name {name!r}: registered by {self._origins[name]} and by {origin}"
            )
        self._items[name] = obj
        self._origins[name] = origin

    def get(self, name: str) -> T:
        if name not in self._items:
            self._load_entry_points()
        if name not in self._items:
            raise UnknownName(self.kind, name, self._items)
        return self._items[name]

    def names(self, pattern: str = "*") -> list[str]:
        self._load_entry_points()
        return sorted(n for n in self._items if fnmatch.fnmatch(n, pattern))

    def origin(self, name: str) -> str:
        self.get(name)
        return self._origins[name]

    def __contains__(self, name: str) -> bool:
        self._load_entry_points()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in metadata.entry_points(group=self.entry_point_group):
            if ep.name in self._items:
                raise PruneCliError(
                    f"duplicate {self.kind} name {ep.name!r}: built in ({self._origins[ep.name]}) "
                    f"and entry point {ep.value}"
                )
            try:
                obj = ep.load()
            except Exception as exc:  # a broken plugin must not break the whole CLI silently
                raise PruneCliError(f"cannot load {self.kind} plugin {ep.name!r} ({ep.value}): {exc}") from exc
            self.add(ep.name, obj, origin=f"entry point {ep.value}")


def _origin(obj: object) -> str:
    try:
        return f"{inspect.getsourcefile(obj)}:{inspect.getsourcelines(obj)[1]}"  # type: ignore[arg-type]
    except (TypeError, OSError):
        return repr(obj)
