"""`prune-cli info`: what a model file holds, without loading data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from prune_cli.cli import options as O
from prune_cli.cli import ui


def info(
    model_file: Annotated[Path, typer.Argument(help="A .safetensors model file written by prune-cli.")],
    trust_factory: O.TrustFactory = None,
    json: O.Json = False,
) -> None:
    """Architecture, pruned widths, parameter and MAC counts, and provenance of MODEL_FILE."""
    import torch

    from prune_cli import metrics
    from prune_cli.store.modelfile import build_architecture, load_model, module_widths, read_metadata

    trust = trust_factory or ()
    arch, meta = read_metadata(model_file)
    model = load_model(model_file, trust=trust)
    original = module_widths(build_architecture({**arch, "widths": {}, "dynamic": None}, trust=trust))
    pruned = {
        name: f"{original[name]['out']} -> {w['out']}"
        for name, w in arch["widths"].items()
        if name in original and w["out"] != original[name]["out"] and w["type"] != "Linear"
        and not w["type"].startswith("BatchNorm")
    }  # fmt: skip
    shape = meta.get("input_shape")
    macs = None
    if shape:
        macs = metrics.count_macs(model, torch.zeros(1, *shape))
    row = {
        "file": str(model_file),
        "factory": arch["factory"],
        "kwargs": arch.get("kwargs", {}),
        "kind": meta.get("kind", "?"),
        "dataset": meta.get("dataset"),
        "input_normalisation": meta.get("normalisation"),  # (x / 255 - mean) / std per channel
        "params": metrics.count_params(model),
        "macs": macs,
        "dynamic": (arch.get("dynamic") or {}).get("criterion"),
        "pruned_layers": pruned,
        "provenance": {k: meta[k] for k in ("criterion", "target", "seed", "machine", "metrics") if k in meta},
    }
    if json:
        ui.print_json(row)
        return
    ui.table(
        [(k, v if not isinstance(v, dict) else ", ".join(f"{a}={b}" for a, b in v.items()) or "-")
         for k, v in row.items() if k != "pruned_layers" and k != "provenance"],
        title=f"{model_file.name}",
    )  # fmt: skip
    if pruned:
        ui.grid(["layer", "out channels"], list(pruned.items()), title="pruned layers")
    for key, value in row["provenance"].items():
        ui.out.print(f"{key}: {value}", markup=False)


def register(app: typer.Typer) -> None:
    app.command("info")(ui.user_errors(info))
