"""`prune-cli sinf build` / `prune-cli sinf eval`: semantic inference with per-cluster subgraphs (arXiv 2310.01259)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from prune_cli.cli import options as O
from prune_cli.cli import ui

SINF = "SINF"

sinf_app = typer.Typer(
    help="SINF: a shared extractor, a router and one DCS-pruned subgraph per class cluster (arXiv 2310.01259).",
    no_args_is_help=True,
)


@O.grouped(run="seed trust_factory device threads json quiet")
def build(
    model_file: Annotated[Path, typer.Argument(help="A trained .safetensors model file.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the SINF file set.", rich_help_panel=O.OUTPUT)],
    dataset: O.Dataset = None,
    data_dir: O.DataDir = None,
    r_L: Annotated[float, typer.Option("--rL", help="Removed fraction of the last layer.", rich_help_panel=SINF)] = 0.6,
    r_M: Annotated[
        float, typer.Option("--rM", help="Removed fraction of the first layer after the router.", rich_help_panel=SINF)
    ] = 0.1,
    clusters: Annotated[
        int,
        typer.Option(
            help="K clusters of classes (agglomerative; used when the data have no superclasses).", rich_help_panel=SINF
        ),
    ] = 5,
    superclasses: Annotated[
        bool, typer.Option(help="Use the dataset's superclasses when it has them (CIFAR-100).", rich_help_panel=SINF)
    ] = True,
    threshold: Annotated[
        float, typer.Option(help="Validation cluster accuracy the router must reach.", rich_help_panel=SINF)
    ] = 0.75,
    gamma: Annotated[
        float, typer.Option(help="Router confidence below which the full model runs.", rich_help_panel=SINF)
    ] = 0.0,
    restrict: Annotated[
        bool, typer.Option(help="Predict only among the routed cluster's classes.", rich_help_panel=SINF)
    ] = True,
    bn_recalibration: Annotated[
        bool,
        typer.Option(
            help="Re-estimate each subgraph's BatchNorm statistics on its cluster (no training).", rich_help_panel=SINF
        ),
    ] = True,
    router_epochs: Annotated[int, typer.Option(help="Router training epochs.", rich_help_panel=SINF)] = 30,
    router_images: Annotated[int, typer.Option(help="Training images for the router.", rich_help_panel=SINF)] = 20000,
    dcs_images_per_class: Annotated[
        int, typer.Option(help="Training images per class for DCS.", rich_help_panel=SINF)
    ] = 256,
    opt: Annotated[
        list[str] | None,
        typer.Option("--opt", help="DCS option name=value (q, activation, probe, ...).", rich_help_panel=SINF),
    ] = None,
    scope: Annotated[str, typer.Option(help="internal or all (ResNet residual groups).", rich_help_panel=SINF)] = (
        "internal"
    ),
    run: O.RunOptions = O.RunOptions(),
) -> None:
    """Build SINF from MODEL_FILE: clusters, router and attachment point, DCS per cluster, pruned subgraphs.

    Example: prune-cli sinf build base.safetensors --dataset fashion-mnist --rL 0.6 --rM 0.1 --out sinf/
    """
    from prune_cli.api import get_criterion
    from prune_cli.config import build_dataclass, parse_key_values
    from prune_cli.run import loading
    from prune_cli.run.environment import machine
    from prune_cli.sinf import model as sinf
    from prune_cli.store.files import check_output, deferred_writes

    check_output(out, kind="folder")
    dev = run.setup()
    cfg = sinf.SinfConfig(
        r_M=r_M,
        r_L=r_L,
        clusters=clusters,
        use_superclasses=superclasses,
        threshold=threshold,
        gamma=gamma,
        restrict=restrict,
        bn_recalibration=bn_recalibration,
        router_epochs=router_epochs,
        router_images=router_images,
        dcs_images_per_class=dcs_images_per_class,
        scope=scope,
        dcs=build_dataclass(get_criterion("dcs").Options, parse_key_values(opt), "dcs option"),
        seed=run.seed,
    )
    base, dataset, splits = loading.load_model_and_data(
        model_file, dataset, data_dir, seed=run.seed, device=dev, trust=run.trust
    )
    built = sinf.build(base, splits, cfg, device=dev, log=ui.info)
    with deferred_writes():  # the folder's files appear together or not at all
        sinf.save(
            built,
            out,
            model_file=str(model_file),
            dataset=dataset,
            data_dir=str(data_dir) if data_dir else None,
            seed=run.seed,
            machine=machine(),
            normalisation=loading.normalisation(splits),
        )
    m = built.manifest
    row = {
        "out": str(out),
        "clusters": len(m["clusters"]),
        "cluster_source": m["cluster_source"],
        "attached_at": m["cut_label"],
        "router_val_cluster_acc": m["router"]["val_cluster_acc"],
        "pruned_groups": len(m["groups"]),
        "removed_fraction": f"{m['removed_fractions'][0]:.3f} -> {m['removed_fractions'][-1]:.3f}",
        "build_seconds": m["build_seconds"],
    }
    if run.json:
        ui.print_json({**row, "clusters": m["clusters"], "router": m["router"]})
        return
    ui.table(row, title="sinf build")
    ui.grid(
        ["candidate", "channels", "val cluster acc"],
        [[c["label"], c["channels"], f"{c['val_cluster_acc']:.4f}"] for c in m["router"]["candidates"]],
        title="router attachment (earliest reaching the threshold)",
    )


@O.grouped(run="seed trust_factory device threads json quiet")
def evaluate(
    folder: Annotated[Path, typer.Argument(help="A SINF folder written by `prune-cli sinf build`.")],
    dataset: O.Dataset = None,
    data_dir: O.DataDir = None,
    split: O.Split = "test",
    gamma: Annotated[float | None, typer.Option(help="Override the confidence threshold.", rich_help_panel=SINF)] = (
        None
    ),
    restrict: Annotated[
        bool | None,
        typer.Option(help="Override: predict only among the routed cluster's classes.", rich_help_panel=SINF),
    ] = None,
    latency_batches: Annotated[
        str, typer.Option(help="Batch sizes for latency (1 and a routed deployment's batch).", rich_help_panel=O.OUTPUT)
    ] = "1,64",
    sweep: Annotated[bool, typer.Option(help="Run the r_L / r_M grid; write table and plot.", rich_help_panel=SINF)] = (
        False
    ),
    rL_grid: Annotated[
        str | None, typer.Option("--rL-grid", help="r_L values (default 0.9..0.1).", rich_help_panel=SINF)
    ] = None,
    rM_grid: Annotated[
        str | None, typer.Option("--rM-grid", help="r_M values (default 0.1..0.02).", rich_help_panel=SINF)
    ] = None,
    sweep_out: Annotated[
        Path | None, typer.Option(help="Folder for sweep.{csv,md,png} (default: FOLDER).", rich_help_panel=O.OUTPUT)
    ] = None,
    run: O.RunOptions = O.RunOptions(),
) -> None:
    """Evaluate a SINF folder against its base model: top-1, per-cluster accuracy, MACs, latency, storage.

    MACs per input are extractor + router + the routed subgraph, the router shown apart; latency is measured
    at batch 1 and at a routed deployment's batch. --sweep runs the r_L / r_M grid and writes
    sweep.csv, sweep.md and sweep.png.
    """
    from prune_cli.errors import BadValue
    from prune_cli.run import loading
    from prune_cli.sinf import model as sinf
    from prune_cli.sinf import report as sinf_report
    from prune_cli.store.files import check_output, deferred_writes

    if sweep:
        check_output(sweep_out or folder, "--sweep-out", kind="folder")
    dev = run.setup()
    batches = O.parse_batches(latency_batches)
    if split not in ("test", "val"):
        raise BadValue(f"--split must be test or val, got {split!r}")
    built = sinf.load(folder, dev, trust=run.trust)
    info = built.manifest.get("info", {})
    if gamma is not None:
        if not 0 <= gamma <= 1:
            raise BadValue(f"--gamma must be in [0, 1], got {gamma}")
        built.model.gamma = gamma
    if restrict is not None:
        built.model.restrict = restrict
    dataset = dataset or info.get("dataset")
    if dataset is None:
        raise BadValue(f"{folder} does not record its dataset: pass --dataset")
    data_dir = data_dir or (Path(info["data_dir"]) if info.get("data_dir") else None)
    splits = loading.load_splits(
        dataset, data_dir, model_name=built.base.prune_cli_arch["factory"], seed=info.get("seed", run.seed),
        normalisation=loading.recorded_normalisation(info, dataset),
    )  # fmt: skip
    base_info = getattr(built.base, "prune_cli_info", {})
    loading.check_runs_on(built.base, str(folder), splits, trained_on=base_info.get("input_shape"))
    data = getattr(splits, split)
    result = sinf_report.evaluate(built, data, splits, device=dev)
    result.update(sinf_report.latencies(built, data, splits, batches, device=dev))
    result["storage"] = sinf_report.storage(built.model, built.base)
    result["gamma"], result["restrict"] = built.model.gamma, built.model.restrict
    if sweep:
        grids = {"r_L_grid": _floats(rL_grid, "--rL-grid"), "r_M_grid": _floats(rM_grid, "--rM-grid")}
        with ui.RichReporter():
            rows = sinf_report.sweep(
                built, data, splits, device=dev, log=ui.info, **{k: v for k, v in grids.items() if v}
            )
        with deferred_writes():
            files = sinf_report.write_sweep(rows, sweep_out or folder, title=f"SINF sweep, {dataset} ({split})")
        result["sweep"] = rows
        result["sweep_files"] = [str(f) for f in files]
    if run.json:
        ui.print_json(result)
        return
    show(result, batches)


def show(r: dict, batches: list[int]) -> None:
    st = r["storage"]
    h = ui.human
    rows = [
        ["top-1", f"{r['base_top1']:.4f}", f"{r['top1']:.4f}", f"{100 * (r['top1'] - r['base_top1']):+.2f} pt"],
        [
            "within-cluster top-1",
            f"{r['base_within_cluster_acc']:.4f}",
            f"{r['within_cluster_acc']:.4f}",
            f"{100 * (r['within_cluster_acc'] - r['base_within_cluster_acc']):+.2f} pt",
        ],
        ["MACs per input", h(r["base_macs"]), h(r["macs_per_input"]), f"{-100 * r['macs_reduction']:+.1f}%"],
        ["  extractor", "", h(r["macs_extractor"]), ""],
        ["  router (overhead)", "", h(r["macs_router"]), f"{100 * r['macs_router'] / r['base_macs']:.2f}% of base"],
        ["  subgraph (mean)", "", h(r["macs_subgraph_mean"]), ""],
    ]
    for b in batches:
        lb, ls = r[f"base_latency_b{b}_ms"], r[f"sinf_latency_b{b}_ms"]
        rows.append([f"latency b{b} (ms)", f"{lb:.3f}", f"{ls:.3f}", f"{100 * (ls / lb - 1):+.1f}%"])
    rows.append(
        [
            "params stored",
            h(st["base_params"]),
            h(st["sinf_params_total"]),
            f"{st['sinf_params_total'] / st['base_params']:.2f}x",
        ]
    )
    rows.append(["  all subgraphs", "", h(st["subgraphs_params_total"]), h(st["subgraphs_bytes_total"], "B")])
    ui.grid(["", "base", "SINF", "change"], rows, title=f"SINF on {r['images']} images (gamma {r['gamma']})")
    ui.out.print(
        f"route accuracy {r['route_acc']:.4f}, sent to the full model {100 * r['fallback_rate']:.1f}%", markup=False
    )
    ui.grid(
        ["cluster", "classes", "images", "route acc", "base", "SINF", "base within", "subgraph within", "MACs"],
        [
            [
                c["cluster"],
                ",".join(map(str, c["classes"])),
                c["images"],
                f"{c['route']:.3f}",
                f"{c['base']:.3f}",
                f"{c['sinf']:.3f}",
                f"{c['base_within']:.3f}",
                f"{c['sub_within']:.3f}",
                h(c["subgraph_macs"]),
            ]
            for c in r["per_cluster"]
        ],
        title="per cluster (within: restricted to the cluster's classes, true cluster given)",
    )
    for f in r.get("sweep_files", []):
        ui.info(f"wrote {f}")


def _floats(text: str | None, flag: str) -> list[float] | None:
    from prune_cli.errors import BadValue

    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BadValue(f"{flag} must be numbers separated by commas, got {text!r}") from None
    if not values or not all(0 <= v < 1 for v in values):
        raise BadValue(f"{flag} values are removed fractions in [0, 1), got {text!r}")
    return values


def register(app: typer.Typer) -> None:
    sinf_app.command("build")(ui.user_errors(build))
    sinf_app.command("eval")(ui.user_errors(evaluate))
    app.add_typer(sinf_app, name="sinf")
