"""Output files: checked before a command starts its work, written at its end, never half-written.

`check_output` refuses a path that cannot be written (a folder where a file is meant, a parent that is a file, a name
longer than the file system allows, a folder without write permission) before any work is done. `atomic_write`
writes to a temporary name in the same folder and renames it over the final name, so an interrupted run never
leaves a half-written file and an existing output is only ever replaced by a complete new one. Inside
`deferred_writes()` the renames wait until the block ends without an error: a command that writes several files
(scores, sweep and plot) then leaves either all of them or none, and a failure half-way changes no existing file.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

from prune_cli.errors import PruneCliError


class CannotWrite(PruneCliError):
    """An output path that cannot be written (bad place, bad name, no permission, full disk)."""


F = TypeVar("F", bound=Callable[..., Any])

_NAME_MAX = 255  # bytes per path component on ext4, xfs, btrfs, APFS and NTFS
_TMP_STEM = 40  # the temporary name keeps at most this much of the final name, so a long name still has room


def check_output(
    path: str | Path, what: str = "--out", kind: Literal["file", "folder"] = "file", also: Iterable[str] = ()
) -> Path:
    """Refuse, before any work, an output `path` that cannot be created; return it.

    Checks that a file output is not a folder (and a folder output not a file), that the nearest existing ancestor
    is a writable folder (not a file), and that every name to create fits the file system. `also`: names of files
    written beside `path` (e.g. `scores_sweep.csv`), checked for length too.
    """
    path = Path(path)
    if kind == "file" and _kind(path) == "folder":
        raise CannotWrite(f"{what} {path} is a folder; give a file name")
    if kind == "folder" and _kind(path) == "file":
        raise CannotWrite(f"{what} {path} is a file, not a folder; give a folder (it is created if missing)")
    existing = path if kind == "folder" and _kind(path) == "folder" else path.parent
    created: list[str] = [] if existing == path else [path.name]
    while _kind(existing) is None and existing != existing.parent:
        created.append(existing.name)
        existing = existing.parent
    probe = existing if _kind(existing) is not None else Path(".")
    if _kind(probe) != "folder":
        raise CannotWrite(f"{what} {path}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CannotWrite(f"{what} {path}: no permission to write in {probe}")
    limit = _name_max(probe)
    for name in [*created, *also]:
        size = len(os.fsencode(name))
        if size > limit:
            raise CannotWrite(
                f"{what} {path}: the name {_short(name)} is {size} bytes long; the file system allows {limit}"
            )
    return path


def _kind(path: Path) -> Literal["file", "folder"] | None:
    """What is at `path` (following links); None when nothing is, or the name cannot exist (too long, a path
    through a file): pathlib's is_dir() raises on some of those."""
    try:
        return "folder" if path.is_dir() else "file" if path.exists() else None
    except OSError:
        return None


def _name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (AttributeError, OSError, ValueError):
        return _NAME_MAX


def _short(name: str) -> str:
    return repr(name if len(name) <= 40 else f"{name[:20]}...{name[-12:]}")


_pending: list[list[tuple[Path, Path]]] = []  # one list of (temporary, final) per open deferred_writes() block


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path` (at the end of an enclosing
    `deferred_writes()` block, if there is one), on error it is removed. OS errors of its own steps (making the
    folder, creating or renaming the file) are `CannotWrite`; errors of the caller's writing pass through."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name[:_TMP_STEM]}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise CannotWrite(f"cannot write {path}: {exc.strerror or exc}") from exc
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        # mkstemp makes the file private (0600); an output gets the mode a plain open() would give it.
        _chmod_like(tmp, path)
        if _pending:
            _pending[-1].append((tmp, path))
        else:
            _replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def deferred_writes() -> Iterator[None]:
    """Hold back the renames of every `atomic_write` inside the block until it ends without an error; on an error
    remove their temporary files, so no output is created or changed. Files written inside cannot be read back
    under their final names before the block ends."""
    pending: list[tuple[Path, Path]] = []
    _pending.append(pending)
    try:
        yield
    except BaseException:
        _discard(pending)
        raise
    finally:
        _pending.pop()  # blocks nest, so this block's list is the last one
    for i, (tmp, path) in enumerate(pending):
        try:
            _replace(tmp, path)
        except BaseException:
            _discard(pending[i + 1 :])
            raise


def all_or_nothing(fn: F) -> F:
    """Run `fn` inside `deferred_writes()` (for a command that writes several files)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with deferred_writes():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _discard(pending: list[tuple[Path, Path]]) -> None:
    for tmp, _ in pending:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _replace(tmp: Path, path: Path) -> None:
    try:
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise CannotWrite(f"cannot write {path}: {exc.strerror or exc}") from exc


def _chmod_like(tmp: Path, path: Path) -> None:
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    with contextlib.suppress(OSError):
        os.chmod(tmp, mode)


def write_text(path: str | Path, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text)
