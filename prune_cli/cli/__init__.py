"""The `prune-cli` Typer app: assembles one module per command and maps user errors to exit code 2."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import typer

from prune_cli import __version__
from prune_cli.errors import PruneCliError

app = typer.Typer(
    name="prune-cli",
    help="Which channel-importance criterion should I use to prune this CNN, and what do I really get for it?",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# One module per command; each defines `register(app)`.
COMMANDS = ["train", "evaluate", "info", "listing", "prune", "score", "sinf", "compare", "report", "export"]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"prune-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    """Score channels with published criteria, prune physically, fine-tune, evaluate, compare."""


for _name in COMMANDS:
    try:
        _module = importlib.import_module(f"prune_cli.cli.{_name}")
    except ModuleNotFoundError as _exc:
        if _exc.name != f"prune_cli.cli.{_name}":
            raise
        continue  # command not built yet
    _module.register(app)


def check_own_packages() -> None:
    """`models` and `criteria` are common names: make sure the imported ones are ours, not a user's."""
    root = Path(__file__).resolve().parents[2]
    for name in ("models", "criteria"):
        # find_spec locates a top-level package without running it: importing ours would import torch, which
        # alone takes seconds, and `--help` should not wait for it.
        spec = importlib.util.find_spec(name)
        places = [Path(p).resolve() for p in (spec.submodule_search_locations or [])] if spec else []
        if (root / name) not in places:
            where = ", ".join(map(str, places)) or (spec.origin if spec else "missing")
            raise PruneCliError(
                f"the imported package {name!r} is {where}, not prune-cli's ({root / name}); "
                f"a package of yours shadows it: rename it or run from another folder"
            )


def main() -> None:
    """Console entry point (`prune-cli`, `python -m prune_cli`)."""
    from prune_cli.cli import ui

    try:
        check_own_packages()
    except PruneCliError as exc:
        ui.error(str(exc))
        sys.exit(exc.exit_code)
    app()
