"""`prune-cli list models|datasets|criteria`."""

from __future__ import annotations

import dataclasses
from typing import Annotated

import typer

from prune_cli.cli import options as O
from prune_cli.cli import ui

KINDS = ("models", "datasets", "criteria")


def list_(
    kind: Annotated[str, typer.Argument(help="models, datasets or criteria.")],
    pattern: Annotated[str, typer.Option("--pattern", "-p", help="Shell-style filter, e.g. 'resnet*'.")] = "*",
    json: O.Json = False,
) -> None:
    """List registered models, datasets or criteria."""
    from prune_cli.errors import UnknownName

    if kind not in KINDS:
        raise UnknownName("list kind", kind, KINDS)
    rows: list[dict]
    if kind == "models":
        import models

        rows = [{"name": n} for n in models.list_models(pattern)]
        rows.append({"name": "torchvision:NAME", "note": "any torchvision classifier (random or --weights)"})
        rows.append({"name": "package.module:factory", "note": "your own factory"})
    elif kind == "datasets":
        from prune_cli.data import splits as data

        rows = [{"name": n} for n in data.list_datasets() if _match(n, pattern)]
    else:
        from prune_cli.api import get_criterion, list_criteria

        rows = []
        for n in list_criteria():
            if _match(n, pattern):
                cls = get_criterion(n)
                options = " ".join(f"{f.name}={_plain(f.default)}" for f in dataclasses.fields(cls.Options))
                rows.append({"name": n, "paper": f"arXiv {cls.paper}", "needs": ",".join(sorted(cls.needs)) or "-",
                             "options (defaults)": options})  # fmt: skip
    if json:
        ui.print_json(rows)
        return
    headers = list(dict.fromkeys(k for r in rows for k in r))
    ui.grid(headers, [[r.get(h, "") for h in headers] for r in rows])


def _plain(value: object) -> str:
    """An option default as one would type it after --opt (tuples comma-separated)."""
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return "(none)" if value is dataclasses.MISSING else str(value)


def _match(name: str, pattern: str) -> bool:
    import fnmatch

    return fnmatch.fnmatch(name, pattern)


def register(app: typer.Typer) -> None:
    app.command("list")(ui.user_errors(list_))
