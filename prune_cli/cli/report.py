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
    """Rebuild leaderboard.{csv,md,tex}, the plots and leaderboard-latency.{csv,md} in FOLDER from its records/."""
    from prune_cli.cli.compare import show, show_latency
    from prune_cli.errors import BadValue
    from prune_cli.report import leaderboard as rep
    from prune_cli.store.records import Store

    ui.quiet = quiet
    store = Store(folder)
    if not store.dir.is_dir():
        raise BadValue(f"{folder} holds no records/ folder: is it a `prune-cli compare` output?")
    records = folder_records(folder)
    if failed := sorted((folder / "failed").glob("*.json")):  # compare --executor ray's failed cells: not records
        ui.warn(f"{len(failed)} cells failed and are not in the leaderboard (errors in {folder / 'failed'}); "
                "compare runs them again")  # fmt: skip
    if not records:
        raise BadValue(f"no trusted run records in {store.dir}")
    names = {r.get("experiment") for r in records}
    title = names.pop() if len(names) == 1 else folder.name
    lb, by_latency = rep.write(records, folder, title=title), rep.write_latency(records, folder, title=title)
    files = (rep.LEADERBOARD_FILES if not lb.empty else ()) + (rep.LATENCY_FILES if not by_latency.empty else ())
    ui.info(f"{len(records)} records -> {', '.join(files)} in {folder}")
    show(lb)
    show_latency(by_latency)


def folder_records(folder: Path) -> list[dict]:
    """The trusted run records under FOLDER/records (a corrupt one is skipped with a warning)."""
    from prune_cli.store.records import CorruptRecord, Store

    records = []
    for path, record in Store(folder).records():
        if isinstance(record, CorruptRecord):
            why = str(record).removeprefix(f"{path.stem}: ").removeprefix(f"{path.name}: ")
            ui.warn(f"skipping the run record {path}: {why}")
        else:
            records.append(record)
    return records


def register(app: typer.Typer) -> None:
    app.command("report")(ui.user_errors(report))
