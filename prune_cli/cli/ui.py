"""The one place that owns the consoles: data to stdout, messages and progress to stderr.

Progress bars are transient and silent when stderr is not a terminal. User strings are never parsed as markup.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)
quiet = False


def info(message: str) -> None:
    if not quiet:
        err.print(message, markup=False)


def warn(message: str) -> None:
    err.print(f"warning: {message}", style="yellow", markup=False, soft_wrap=True)


def error(message: str) -> None:
    err.print(f"error: {message}", style="bold red", markup=False, soft_wrap=True)


F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """Wrap a command: a PruneCliError ends it with one red line on stderr and its exit code (2), no traceback.

    PRUNE_CLI_DEBUG=1 re-raises, to show the traceback.
    """
    from prune_cli.errors import PruneCliError

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PruneCliError as exc:
            if os.environ.get("PRUNE_CLI_DEBUG", "") not in ("", "0"):
                raise
            error(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            error("interrupted")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


class RichReporter:
    """engine.Reporter on a rich Progress: one bar per task, fields loss/acc shown when given."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=err,
            transient=True,
            disable=quiet or not err.is_terminal,
        )

    def __enter__(self) -> RichReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def start(self, label: str, total: int) -> object:
        return self.progress.add_task(label, total=total, stats="")

    def update(self, task: object, advance: int = 1, **fields: float) -> None:
        stats = "  ".join(f"{k} {v:.4f}" for k, v in fields.items())
        self.progress.update(task, advance=advance, **({"stats": stats} if fields else {}))  # type: ignore[arg-type]

    def stop(self, task: object) -> None:
        self.progress.remove_task(task)  # type: ignore[arg-type]

    def counter(self, label: str, total: int):
        """A plain `advance(n)` callable for library code that only reports steps (api.Context.progress)."""
        task = self.start(label, total)
        return lambda advance=1: self.update(task, advance)


def table(rows: Sequence[tuple[str, Any]] | Mapping[str, Any], title: str | None = None) -> None:
    """Print name/value rows to stdout as a two-column table."""
    t = Table(title=title, show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column(justify="right")
    for name, value in rows.items() if isinstance(rows, Mapping) else rows:
        t.add_row(str(name), value if isinstance(value, str) else fmt(value))
    out.print(t)


def grid(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> None:
    t = Table(title=title)
    for h in headers:
        t.add_column(h, justify="right" if h != headers[0] else "left")
    for row in rows:
        t.add_row(*(v if isinstance(v, str) else fmt(v) for v in row))
    out.print(t)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"
