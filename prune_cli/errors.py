"""User-facing errors. Every `PruneCliError` ends a command with one line on stderr and exit code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PruneCliError(Exception):
    """A problem the user can fix (bad name, bad value, missing file). Exit code 2, no traceback."""

    exit_code = 2


class UnknownName(PruneCliError):
    """A name (model, dataset, criterion, option) that is not registered."""

    def __init__(self, kind: str, name: str, known: Iterable[str]):
        known = sorted(known)
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        listing = (
            "" if close else f" (known: {', '.join(known)})" if len(known) <= 12 else f" (see `prune-cli list {kind}s`)"
        )
        super().__init__(f"unknown {kind} {name!r}{hint}{listing}")
        self.kind, self.name, self.suggestions = kind, name, close


class BadValue(PruneCliError):
    """A value of the right kind but out of range or of the wrong shape."""


class BadConfig(PruneCliError):
    """An experiment file or option set that does not fit its schema."""


class DataMissing(PruneCliError):
    """A dataset folder or file that is not where the user said it is."""


class BadModelFile(PruneCliError):
    """A model file that is corrupt, not ours, or does not fit the requested architecture."""


class UnsupportedGraph(PruneCliError):
    """A model whose traced graph contains an operation surgery cannot reason about."""


class TargetUnreachable(PruneCliError):
    """A cost target that no keep-plan allowed by the constraints can meet."""
