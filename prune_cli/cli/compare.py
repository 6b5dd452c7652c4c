"""`prune-cli compare`: run an experiment's grid (criterion x target x seed) and print its leaderboard."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from prune_cli.cli import options as O
from prune_cli.cli import ui
from prune_cli.errors import BadValue, PruneCliError


class CellsFailed(PruneCliError):
    """Cells of a grid whose runs raised (recorded under OUT/failed/); the others finished."""


@O.grouped(run="trust_factory device threads quiet")
def compare(
    experiment: Annotated[Path, typer.Argument(help="An experiment YAML file (see experiments/).")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Output folder (default runs/NAME).", rich_help_panel=O.OUTPUT)
    ] = None,  # fmt: skip
    criteria: Annotated[
        str | None, typer.Option(help="Override: comma-separated criteria, or all.", rich_help_panel=O.PRUNE)
    ] = None,  # fmt: skip
    targets: Annotated[
        str | None, typer.Option(help="Override: fractions to remove, e.g. 0.3,0.5.", rich_help_panel=O.PRUNE)
    ] = None,  # fmt: skip
    latency_targets: Annotated[
        str | None,
        typer.Option(
            help="Override: fractions of the measured latency to remove (at the experiment's latency_batch), e.g. "
            "0.3; an equal-latency leaderboard of their own. Run such a grid with --jobs 1 on an idle machine.",
            rich_help_panel=O.PRUNE,
        ),
    ] = None,  # fmt: skip
    seeds: Annotated[str | None, typer.Option(help="Override: seeds, e.g. 0,1,2.", rich_help_panel=O.RUN)] = None,
    runtime: Annotated[
        str | None,
        typer.Option(
            help="Override: what latency is timed with, torch or onnxruntime (needs the extra: pip install "
            "'prune-cli\\[onnx]').",
            rich_help_panel=O.OUTPUT,
        ),
    ] = None,  # fmt: skip
    finetune_epochs: Annotated[
        int | None, typer.Option(help="Override: fine-tuning epochs (every criterion).", rich_help_panel=O.TRAIN)
    ] = None,  # fmt: skip
    base: Annotated[
        Path | None, typer.Option(help="Override: a trained base model file.", rich_help_panel=O.RUN)
    ] = None,  # fmt: skip
    bn_recalibration: Annotated[
        bool | None,
        typer.Option(
            "--bn-recalibration/--no-bn-recalibration",
            rich_help_panel=O.PRUNE,
            help="Override: re-estimate BatchNorm statistics after removal (default: the experiment's, else on).",
        ),
    ] = None,  # fmt: skip
    dataset: O.Dataset = None,
    data_dir: O.DataDir = None,
    jobs: Annotated[
        int | None,
        typer.Option(
            "--jobs",
            "-j",
            rich_help_panel=O.RUN,
            help="Cells run in parallel processes (threads divided); with --executor ray and no --address, the CPUs "
            "of the local Ray instance (default: every core).",
        ),
    ] = None,  # fmt: skip
    executor: Annotated[
        str | None,
        typer.Option(help="Override: where cells run, local (processes) or ray (tasks).", rich_help_panel=O.RUN),
    ] = None,  # fmt: skip
    address: Annotated[
        str | None,
        typer.Option(
            help="Ray: an existing cluster's address, e.g. 10.0.0.1:6379 (default: start a local one).",
            rich_help_panel=O.RUN,
        ),
    ] = None,  # fmt: skip
    cpus_per_cell: Annotated[
        int, typer.Option(help="Ray: CPUs (and torch threads) each cell reserves.", rich_help_panel=O.RUN)
    ] = 1,  # fmt: skip
    gpus_per_cell: Annotated[
        float, typer.Option(help="Ray: GPUs each cell reserves (> 0: cells run on the GPU).", rich_help_panel=O.RUN)
    ] = 0.0,  # fmt: skip
    shared_dir: Annotated[
        Path | None,
        typer.Option(
            help="Ray: a folder every node mounts at this path; tasks leave their model files there instead of "
            "sending them back (default: the experiment's shared_dir, else none).",
            rich_help_panel=O.RUN,
        ),
    ] = None,  # fmt: skip
    defer_timing: Annotated[
        bool,
        typer.Option(
            help="Leave finished cells untimed in OUT/pending (a grid on a busy machine); a later run without it "
            "times them one at a time, which it should do on an idle machine.",
            rich_help_panel=O.RUN,
        ),
    ] = False,  # fmt: skip
    time_pending: Annotated[
        bool,
        typer.Option(
            help="Run no new cell: time the finished cells waiting untimed in OUT/pending (left by --defer-timing or "
            "an interrupted run) and file their records. Run it on an idle machine.",
            rich_help_panel=O.RUN,
        ),
    ] = False,  # fmt: skip
    run: O.RunOptions = O.RunOptions(),
) -> None:
    """Prune one base model with every criterion of EXPERIMENT at equal cost, and rank them.

    Each cell is stored as a run record under OUT/records; a re-run skips finished cells, so an interrupted
    comparison resumes where it stopped. Example: prune-cli compare experiments/quickstart.yaml
    """
    from prune_cli import metrics
    from prune_cli.cli.report import folder_records
    from prune_cli.report import leaderboard as report
    from prune_cli.run import grid
    from prune_cli.run.experiment import load_experiment

    overrides = {"out": str(out) if out else None, "criteria": criteria, "targets": targets, "seeds": seeds,
                 "latency_targets": latency_targets,
                 "dataset": dataset, "data_dir": str(data_dir) if data_dir else None,
                 "base": {"file": str(base)} if base else None, "bn_recalibration": bn_recalibration,
                 "executor": executor, "shared_dir": str(shared_dir) if shared_dir else None,
                 "runtime": runtime}  # fmt: skip
    exp = load_experiment(experiment, overrides)
    if exp.runtime == "onnxruntime":  # a missing extra is one line now, not after the grid's hours
        from prune_cli.store.onnx import require_onnx

        require_onnx()
    cluster = None
    if exp.executor == "ray":
        from prune_cli.run.ray_executor import RaySettings

        cluster = RaySettings(address=address, num_cpus=jobs, cpus_per_cell=cpus_per_cell, gpus_per_cell=gpus_per_cell)
    elif address is not None or cpus_per_cell != 1 or gpus_per_cell != 0 or shared_dir is not None:
        raise BadValue("--address, --cpus-per-cell, --gpus-per-cell and --shared-dir are for --executor ray")
    if finetune_epochs is not None:  # a nested key: replace it in the parsed experiment (run_grid validates it)
        exp = replace(exp, finetune=replace(exp.finetune, epochs=finetune_epochs))
    if exp.latency_targets and ((jobs or 1) > 1 or exp.executor == "ray"):
        ui.warn("latency targets time their selection inside each cell: cells running at once slow each other's "
                "timings down; run this grid with --jobs 1 on an idle machine")  # fmt: skip
    dev = run.setup()
    with ui.RichReporter() as reporter:
        result = grid.run_grid(
            exp, jobs=1 if jobs is None else jobs, device=dev, reporter=reporter, log=ui.info, warn=ui.warn,
            trust=run.trust, cluster=cluster, defer_timing=defer_timing, time_pending_only=time_pending,
        )  # fmt: skip
    records = result.records
    if records and (criteria or targets or seeds or latency_targets):
        # A narrowed run ranks its cells among the experiment's others in OUT, as `prune-cli report` would: its
        # leaderboard files must not replace the full one with a part of it.
        records = [r for r in folder_records(exp.out_dir) if r.get("experiment") == exp.name]
    if records:
        lb = report.write(records, exp.out_dir, title=exp.name)
        by_latency = report.write_latency(records, exp.out_dir, title=exp.name)
        ui.info(f"{result.ran} cells run, {result.skipped} reused; leaderboard of {len(records)} records written "
                f"to {exp.out_dir}")  # fmt: skip
        show(lb)
        show_latency(by_latency)
        loads = [r["after"].get("load_average") or 0 for r in result.records]
        if warning := metrics.busy_machine_warning({"load_average": max(loads, default=0), "device": dev.type}):
            ui.warn(warning)
    if result.failed:  # after the leaderboard of the cells that finished: one line, exit 2
        first = result.failed[0]["error"]
        raise CellsFailed(f"{len(result.failed)} of {result.ran} cells run failed (first: {first}); their errors "
                          f"are in {exp.out_dir / grid.FAILED}; run compare again to retry them")  # fmt: skip


def show(lb) -> None:
    """Print the leaderboard with rich, one compact table per target (the files hold every column)."""
    from prune_cli.report import leaderboard as report

    if lb.empty:  # only latency targets
        return
    table = report.formatted(lb)
    keep = ["rank", "criterion", "MACs removed", "top-1", "drop (pt)", "MAC speed-up"]
    keep += [c for c in table.columns if c.startswith("latency speed-up")] + ["scoring (s)"]
    for target, rows in table.groupby("target", sort=False):
        short = rows[keep].rename(columns=lambda c: c.replace("latency speed-up ", "latency "))
        ui.grid(list(short.columns), short.values.tolist(), title=f"target {target} MACs (top-1 in %, mean ± std)")


def show_latency(lb) -> None:
    """Print the equal-latency leaderboard (latency targets), one table per requested fraction and batch size."""
    from prune_cli.report import leaderboard as report

    if lb.empty:
        return
    table = report.formatted_latency(lb)
    keep = ["rank", "criterion", "latency removed", "top-1", "drop (pt)", "MACs removed", "note"]
    for target, rows in table.groupby("target", sort=False):
        ui.grid(keep, rows[keep].values.tolist(), title=f"target {target} (top-1 in %, mean ± std)")


def register(app: typer.Typer) -> None:
    app.command("compare")(ui.user_errors(compare))
