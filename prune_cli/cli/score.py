"""`prune-cli score`: score channels with one criterion (or every static one) and write what it decided as CSV.

What the CSV holds depends on the criterion's result: per-channel scores for `Scores` (group, channel, score,
rank, kept at the requested target), per-group ratios for `Allocation` (group, size, ratio, kept, and any
per-group numbers the criterion reports, e.g. sensitivity), kept sets for `Plan` (group, channel, kept).
Sensitivity also writes `<stem>_sweep.csv` and `<stem>_sweep.png`; `--compare-checkpoint` runs the same
criterion on a second model file and reports how alike the two layer rankings are (Spearman, Kendall).

`--criterion all` runs every registered static criterion and prints the mean over groups of the per-group
Spearman correlation between every two criteria (`<stem>_spearman.csv`). The correlations are computed in
`prune_cli.report.correlations`; this module parses, writes and prints.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer

from prune_cli.cli import options as O
from prune_cli.cli import ui


@O.grouped(
    select="mode scope round_to fast_widths max_ratio calib_images", run="seed trust_factory device threads quiet"
)
def score(
    model_file: Annotated[Path, typer.Argument(help="A trained .safetensors model file.")],
    criterion: Annotated[
        str, typer.Option("--criterion", "-c", help="A criterion (`prune-cli list criteria`) or 'all' (static ones).")
    ] = "l1",
    out: Annotated[Path, typer.Option("--out", "-o", help="CSV file to write.", rich_help_panel=O.OUTPUT)] = Path(
        "scores.csv"
    ),
    target_macs: O.TargetMacs = None,
    target_params: O.TargetParams = None,
    opt: Annotated[
        list[str] | None,
        typer.Option(
            "--opt", help="Criterion option name=value, or criterion.name=value (repeatable).", rich_help_panel=O.PRUNE
        ),
    ] = None,
    select: O.SelectOptions = O.SelectOptions(),
    compare_checkpoint: Annotated[
        Path | None,
        typer.Option(help="Second model file: compare its layer ranking with this one's.", rich_help_panel=O.OUTPUT),
    ] = None,
    dataset: O.Dataset = None,
    data_dir: O.DataDir = None,
    run: O.RunOptions = O.RunOptions(),
) -> None:
    """Score MODEL_FILE's channels with a criterion and write the scores (or ratios, or kept sets) as CSV.

    Example: prune-cli score base.safetensors --criterion sensitivity --target-macs 0.5 --out sens.csv
    """
    import torch

    from prune_cli import surgery
    from prune_cli.api import Target, check_result
    from prune_cli.config import parse_key_values
    from prune_cli.errors import BadValue, PruneCliError
    from prune_cli.report import correlations
    from prune_cli.run import loading, pruning
    from prune_cli.selection import plan as selection
    from prune_cli.store.files import check_output

    if target_macs is not None and target_params is not None:
        raise BadValue("give at most one of --target-macs or --target-params (the fraction to remove)")
    target = Target("params", target_params) if target_params is not None else Target("macs", target_macs or 0.5)
    if out.suffix != ".csv":
        raise BadValue(f"--out must end in .csv, got {out.name!r}")
    # The files written beside OUT: their names must fit too.
    beside = {"all": ["spearman.csv"], "sensitivity": ["sweep.csv", "sweep.png"]}.get(criterion, [])
    beside += ["compare.csv"] if compare_checkpoint is not None else []
    check_output(out, also=[f"{out.stem}_{s}" for s in beside])
    names = static_criteria() if criterion == "all" else [criterion]
    if compare_checkpoint is not None and criterion == "all":
        raise BadValue("--compare-checkpoint compares one criterion's layer rankings: name the criterion")
    options = split_options(parse_key_values(opt), names)
    common = dict(target=target, **asdict(select), seed=run.seed)
    jobs = {n: pruning.PruneJob(criterion=n, options=options[n], **common) for n in names}  # type: ignore[arg-type]
    crits = {n: pruning.build_criterion(n, options[n]) for n in names}  # bad names and options fail before loading
    if criterion != "all" and crits[criterion].dynamic:
        raise BadValue(f"{criterion!r} is a dynamic criterion: it has no static channel scores to write")
    dev = run.setup()
    base, dataset, splits = loading.load_model_and_data(
        model_file, dataset, data_dir, seed=run.seed, device=dev, trust=run.trust
    )
    other = None
    if compare_checkpoint is not None:  # a bad second file fails now, not after the first one is scored
        other, _, _ = loading.load_model_and_data(
            compare_checkpoint, dataset, data_dir, seed=run.seed, device=dev, trust=run.trust
        )
    example = loading.example_input(splits).to(dev)
    groups = surgery.channel_groups(base, example)
    in_scope = selection.groups_in_scope(groups, select.scope)
    selection.check_reachable(surgery.CostModel(base, example), in_scope, target, select.round_to, select.max_ratio)

    def score_one(model, name: str, reporter) -> tuple[Any, Any, dict, dict]:
        ctx = pruning.make_context(model, surgery.channel_groups(model, example), splits, crits[name], jobs[name],
                                   dev, ui.info, reporter.counter)  # fmt: skip
        torch.manual_seed(run.seed)
        result = check_result(crits[name].run(ctx), ctx.groups)
        keep, _, report = pruning.plan_from_result(result, ctx, jobs[name])
        return ctx, result, keep, report

    proxies: dict[str, dict[str, Any]] = {}
    long_rows: list[dict] = []
    with ui.RichReporter() as reporter:
        for name in names:
            ui.info(f"scoring {len(in_scope)} channel groups of {model_file} with {name}")
            try:
                ctx, result, keep, report = score_one(base, name, reporter)
            except PruneCliError as exc:
                if criterion != "all":
                    raise
                ui.warn(f"{name}: {exc} (left out)")
                continue
            if criterion == "all":
                proxies[name] = correlations.channel_proxy(result, ctx)
                long_rows += [{"criterion": name, "result": type(result).__name__, **r}
                              for r in channel_rows(proxies[name], keep, ctx.groups)]  # fmt: skip
                continue
            rows = result_rows(result, ctx, keep)
            write_csv(out, rows)
            ui.info(f"wrote {len(rows)} rows to {out}")
            show(result, ctx, keep, report, name)
            if sweep := getattr(result, "extra", {}).get("sweep"):
                write_sweep(out, sweep, result.extra.get("baseline"))
            if other is not None:
                ui.info(f"scoring {compare_checkpoint} with {name} for the ranking comparison")
                _, other_result, _, _ = score_one(other, name, reporter)
                compare_rankings(result, other_result, out, str(model_file), str(compare_checkpoint))
    if criterion == "all":
        write_csv(out, long_rows)
        ui.info(f"wrote {len(long_rows)} rows to {out}")
        matrix = correlations.spearman_matrix(proxies)
        path = out.with_name(f"{out.stem}_spearman.csv")
        write_csv(path, [{"criterion": a, **{b: matrix[a][b] for b in matrix}} for a in matrix])
        ui.grid(["criterion", *matrix], [[a, *(matrix[a][b] for b in matrix)] for a in matrix],
                title="Spearman rank correlation of channel scores (mean over groups)")  # fmt: skip
        ui.info(f"wrote {path}")


def static_criteria() -> list[str]:
    """Every registered criterion whose result is static (Scores, Allocation or Plan), in name order."""
    from prune_cli.api import get_criterion, list_criteria

    return [n for n in list_criteria() if not get_criterion(n).dynamic]


def split_options(values: Mapping[str, str], names: Sequence[str]) -> dict[str, dict[str, str]]:
    """`criterion.key=value` goes to that criterion; a bare `key=value` only when one criterion is scored."""
    from prune_cli.errors import BadValue, UnknownName

    out: dict[str, dict[str, str]] = {n: {} for n in names}
    for key, value in values.items():
        owner, dot, name = key.rpartition(".")
        if not dot:
            if len(names) != 1:
                raise BadValue(f"with --criterion all, write options as criterion.name=value, not {key!r}")
            owner, name = names[0], key
        if owner not in out:
            raise UnknownName("criterion", owner, names)
        out[owner][name] = value
    return out


# ---------------------------------------------------------------------------------------------------- tables
def result_rows(result, ctx, keep: Mapping[str, Any]) -> list[dict]:
    """The CSV rows of one criterion's result (see the module docstring)."""
    from prune_cli.api import Allocation, Plan, Scores
    from prune_cli.report.correlations import kept_mask

    rows: list[dict] = []
    if isinstance(result, Scores):
        return channel_rows(dict(result.per_group), keep, ctx.groups)
    if isinstance(result, Plan):
        for g in ctx.groups:
            rows += [{"group": g.id, "channel": c, "kept": k} for c, k in enumerate(kept_mask(keep, g))]
        return rows
    assert isinstance(result, Allocation)
    per_group = {k: v for k, v in result.extra.items() if isinstance(v, Mapping) and set(v) >= set(result.ratios)}
    for g in ctx.groups:
        kept = sum(kept_mask(keep, g))
        row = {"group": g.id, "size": g.size, "ratio": float(result.ratios.get(g.id, 0.0)), "kept": kept}
        rows.append({**row, **{k: v[g.id] for k, v in per_group.items()}})
    return rows


def channel_rows(scores: Mapping[str, Any], keep: Mapping[str, Any], groups) -> list[dict]:
    """One row per channel: its score, its rank (1 = best) and whether the plan keeps it."""
    from prune_cli.report.correlations import kept_mask, ranks

    rows = []
    for g in groups:
        if g.id not in scores:
            continue
        s, rank, kept = scores[g.id], ranks(scores[g.id]), kept_mask(keep, g)
        rows += [{"group": g.id, "channel": c, "score": float(s[c]), "rank": rank[c], "kept": kept[c]}
                 for c in range(g.size)]  # fmt: skip
    return rows


def show(result, ctx, keep, report: Mapping[str, Any], name: str) -> None:
    """Per-group summary on stdout: size, kept at the target, and the criterion's own per-group numbers."""
    from prune_cli.api import Allocation

    extra_cols = []
    if isinstance(result, Allocation):
        extra_cols = [k for k, v in result.extra.items() if isinstance(v, Mapping) and set(v) >= set(result.ratios)]
    rows = []
    for g in ctx.groups:
        kept = len(keep[g.id]) if g.id in keep else g.size
        rows.append([g.id, g.size, kept, 1 - kept / g.size,
                     *(float(result.extra[k][g.id]) for k in extra_cols)])  # fmt: skip
    ui.grid(["group", "size", "kept", "removed", *extra_cols], rows, title=f"{name}: {type(result).__name__}")
    ui.out.print(f"target {report['metric']} reduction: requested {report['requested']:.3f}, "
                 f"achieved {report['achieved']:.3f}", markup=False)  # fmt: skip


# ----------------------------------------------------------------------------------------------------- files
def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    from prune_cli.store.files import atomic_write

    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def write_sweep(out: Path, sweep: Sequence[Mapping[str, Any]], baseline: Mapping[str, float] | None) -> None:
    """`<stem>_sweep.csv` (group, level, trial, accuracy, loss) and `<stem>_sweep.png` (mean accuracy vs level)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from prune_cli.store.files import atomic_write

    csv_path, png_path = out.with_name(f"{out.stem}_sweep.csv"), out.with_name(f"{out.stem}_sweep.png")
    write_csv(csv_path, [{k: r[k] for k in ("group", "level", "trial", "accuracy", "loss")} for r in sweep])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for gid in dict.fromkeys(r["group"] for r in sweep):
        by_level: dict[float, list[float]] = {}
        for r in sweep:
            if r["group"] == gid:
                by_level.setdefault(r["level"], []).append(r["accuracy"])
        levels = sorted(by_level)
        accs = [sum(by_level[d]) / len(by_level[d]) for d in levels]
        if baseline is not None:
            levels, accs = [0.0, *levels], [baseline["accuracy"], *accs]
        ax.plot(levels, accs, marker="o", markersize=3, label=gid)
    ax.set_xlabel("damage level (fraction of the group's channels)")
    ax.set_ylabel("calibration top-1 (mean over trials)")
    ax.set_title("sensitivity sweep")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    with atomic_write(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    ui.info(f"wrote {csv_path} and {png_path}")


def compare_rankings(a, b, out: Path, name_a: str, name_b: str) -> dict[str, float]:
    """Spearman and Kendall between the per-group sensitivities of two checkpoints; `<stem>_compare.csv`."""
    from prune_cli.errors import BadValue
    from prune_cli.report.correlations import layer_ranking

    sa, sb = (getattr(r, "extra", {}).get("sensitivity") for r in (a, b))
    if not sa or not sb:
        raise BadValue("--compare-checkpoint needs a criterion that reports per-group sensitivities (sensitivity)")
    stats, rows = layer_ranking(sa, sb)
    if stats["spearman"] != stats["spearman"]:  # NaN
        ui.warn("one of the two checkpoints gives every group the same sensitivity: no ranking to correlate "
                "(more calibration images or measure=loss may separate them)")  # fmt: skip
    write_csv(out.with_name(f"{out.stem}_compare.csv"), rows)
    ui.grid(["group", "S (this)", "S (other)", "rank", "rank (other)"],
            [[r["group"], r["sensitivity_a"], r["sensitivity_b"], r["rank_a"], r["rank_b"]] for r in rows],
            title=f"layer ranking: {name_a} vs {name_b} (rank 1 = most sensitive)")  # fmt: skip
    ui.out.print(f"Spearman rho {stats['spearman']:.3f} (p {stats['spearman_p']:.3g}), "
                 f"Kendall tau {stats['kendall']:.3f} (p {stats['kendall_p']:.3g}) over {len(rows)} groups",
                 markup=False)  # fmt: skip
    return stats


def register(app: typer.Typer) -> None:
    from prune_cli.store.files import all_or_nothing

    # Scores, sweep, plot and comparison are renamed into place together at the end: a failure half-way (a second
    # model file that cannot be compared) leaves no new file and changes no existing one.
    app.command("score")(ui.user_errors(all_or_nothing(score)))
