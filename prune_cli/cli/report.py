"""`prune-cli report DIR`: rebuild every leaderboard table and plot of a comparison from its run records alone."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from prune_cli.cli import ui


def report(
    folder: Annotated[Path, typer.Argument(help="A `compare` output folder (holding records/).")],
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only results.")] = False,
) -> None:
    """Rebuild leaderboard.{csv,md,tex} and the plots in FOLDER from FOLDER/records/*.json."""
    from prune_cli.cli.compare import show
    from prune_cli.errors import BadValue
    from prune_cli.report import leaderboard as rep
    from prune_cli.store.records import CorruptRecord, Store

    ui.quiet = quiet
    store = Store(folder)
    if not store.dir.is_dir():
        raise BadValue(f"{folder} holds no records/ folder: is it a `prune-cli compare` output?")
    records = []
    for path, record in store.records():
        if isinstance(record, CorruptRecord):
            why = str(record).removeprefix(f"{path.stem}: ").removeprefix(f"{path.name}: ")
            ui.warn(f"skipping the run record {path}: {why}")
        else:
            records.append(record)
    if failed := sorted((folder / "failed").glob("*.json")):  # compare --executor ray's failed cells: not records
        ui.warn(f"{len(failed)} cells failed and are not in the leaderboard (errors in {folder / 'failed'}); "
                "compare runs them again")  # fmt: skip
    if not records:
        raise BadValue(f"no trusted run records in {store.dir}")
    names = {r.get("experiment") for r in records}
    lb = rep.write(records, folder, title=names.pop() if len(names) == 1 else folder.name)
    ui.info(f"{len(records)} records -> {', '.join(rep.LEADERBOARD_FILES)} in {folder}")
    show(lb)


def register(app: typer.Typer) -> None:
    app.command("report")(ui.user_errors(report))
