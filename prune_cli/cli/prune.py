"""`prune-cli prune`: score, select, remove, fine-tune, evaluate, and print one before/after table."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from prune_cli.cli import options as O
from prune_cli.cli import ui


@O.grouped(
    select="mode scope round_to fast_widths max_ratio calib_images",
    run="latency_batches runtime seed trust_factory device threads json quiet",
)
def prune(
    model_file: Annotated[Path, typer.Argument(help="A trained .safetensors model file.")],
    criterion: Annotated[str, typer.Option("--criterion", "-c", help="See `prune-cli list criteria`.")] = "l1",
    target_macs: O.TargetMacs = None,
    target_params: O.TargetParams = None,
    target_latency: O.TargetLatency = None,
    latency_batch: O.LatencyBatch = 1,
    opt: Annotated[
        list[str] | None,
        typer.Option("--opt", help="Criterion option name=value (repeatable).", rich_help_panel=O.PRUNE),
    ] = None,
    select: O.SelectOptions = O.SelectOptions(),
    bn_recalibration: O.BnRecalibration = True,
    finetune_epochs: Annotated[int, typer.Option(help="Fine-tuning epochs (0: none).", rich_help_panel=O.TRAIN)] = 0,
    lr: O.Lr = 0.01,
    batch_size: O.BatchSize = 128,
    dataset: O.Dataset = None,
    data_dir: O.DataDir = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Pruned model file.", rich_help_panel=O.OUTPUT)
    ] = None,
    run: O.RunOptions = O.RunOptions(),
) -> None:
    """Prune MODEL_FILE with a criterion to a MACs (or params) target, fine-tune, and compare with the original.

    Example: prune-cli prune base.safetensors --criterion dcs --target-macs 0.5 --finetune-epochs 10 --out p.safetensors
    """
    from prune_cli import metrics
    from prune_cli.api import Target
    from prune_cli.config import parse_key_values
    from prune_cli.errors import BadValue
    from prune_cli.run import pruning

    if sum(t is not None for t in (target_macs, target_params, target_latency)) != 1:
        raise BadValue(
            "give exactly one of --target-macs, --target-params or --target-latency (the fraction to remove)"
        )
    if target_latency is not None:
        from prune_cli.selection.latency import check_latency_target

        check_latency_target(target_latency, latency_batch)
        # What criteria that choose their own widths aim at instead (they say they ignore the latency target).
        target = Target("macs", target_latency)
    else:
        target = Target("macs", target_macs) if target_macs is not None else Target("params", target_params)  # type: ignore[arg-type]
    if out is not None and out.suffix != ".safetensors":
        raise BadValue(f"--out must end in .safetensors, got {out.name!r}")
    if out is not None:
        from prune_cli.store.files import check_output

        check_output(out)  # now, not after the scoring and fine-tuning
    if run.runtime == "onnxruntime":
        from prune_cli.store.onnx import require_onnx

        require_onnx()  # now, not after the scoring
    dev = run.setup()
    job = pruning.PruneJob(
        criterion=criterion, options=parse_key_values(opt), target=target, **asdict(select),
        finetune_epochs=finetune_epochs, lr=lr, batch_size=batch_size, seed=run.seed, recalibrate_bn=bn_recalibration,
        latency_batches=tuple(dict.fromkeys([*run.batches(), *([latency_batch] if target_latency else [])])),
        target_latency=target_latency or 0.0,
        latency_batch=latency_batch, runtime=run.runtime,
    )  # fmt: skip
    with ui.RichReporter() as reporter:
        outcome = pruning.run(model_file, job, dataset=dataset, data_dir=data_dir, device=dev, reporter=reporter,
                              log=ui.info, trust=run.trust)  # fmt: skip
    if out is not None:
        pruning.save(outcome, out)
    if warning := metrics.busy_machine_warning(outcome.after):
        ui.warn(warning)
    if run.json:
        ui.print_json({**outcome.summary(), "out": str(out) if out else None})
        return
    show(outcome.summary(), job.latency_batches)


def show(summary: dict, batches: tuple[int, ...]) -> None:
    """The before/after table: one row per quantity, columns original / pruned / ratio."""
    before, after = summary["before"], summary["after"]
    rows = [
        ["params", ui.human(before["params"]), ui.human(after["params"]), f"{before['params'] / after['params']:.2f}x"],
        ["MACs", ui.human(before["macs"]), ui.human(after["macs"]), f"{before['macs'] / after['macs']:.2f}x"],
    ]
    # Each pruned figure beside the original measured the same way: right after removal, with BatchNorm statistics
    # re-estimated on the same images when the pruned model's were; after fine-tuning, with the statistics training
    # leaves (the original's own).
    same, top1 = before.get("top1_bn_recalibrated", before["top1"]), after.get("top1_before_finetune")
    if top1 is not None:  # none for a method that prunes while it trains (ManiDP)
        rows.append(["top-1 (test)", f"{same:.4f}", f"{top1:.4f} before fine-tune", f"{100 * (top1 - same):+.2f} pt"])
    if after.get("top1") is not None and summary["finetune_epochs"]:
        epochs = summary["finetune_epochs"]
        ft = f"{after['top1']:.4f} after {epochs} epoch{'s' if epochs != 1 else ''}"
        rows.append(["", f"{before['top1']:.4f}", ft, f"{100 * (after['top1'] - before['top1']):+.2f} pt"])
    for b in batches:
        lb, la = before[f"latency_b{b}_ms"], after[f"latency_b{b}_ms"]
        rows.append([f"latency b{b} (ms)", f"{lb:.3f}", f"{la:.3f}", f"{lb / la:.2f}x"])
    ui.grid(["", "original", "pruned", "gain"], rows, title=f"{summary['criterion']} at {summary['target']}")
    if images := after.get("bn_recalibrated_images"):
        ui.out.print(
            f"BatchNorm statistics re-estimated on {images:,} training images after removal, and for the original's "
            f"top-1 before fine-tuning (with the statistics it carries: {before['top1']:.4f}); "
            "--no-bn-recalibration turns this off",
            markup=False,
        )
    elif not summary.get("bn_recalibration", True):
        ui.out.print("BatchNorm statistics not re-estimated after removal (--no-bn-recalibration)", markup=False)
    t = summary["target_report"]
    if t["metric"] == "latency":  # measured against the base in alternating turns, at one batch size
        ui.out.print(
            f"latency at batch {t['latency_batch']} ({t['runtime']}): {t['base_ms']:.3f} -> {t['pruned_ms']:.3f} ms "
            f"after {len(t['rounds'])} round(s); MACs removed {t['macs_reduction']:.3f}",
            markup=False,
        )
    ui.out.print(
        f"target {t['metric']} reduction: requested {t['requested']:.3f}, achieved {t['achieved']:.3f}; "
        f"scoring {summary['timings']['score_s']:.1f} s, surgery {summary['timings']['surgery_s']:.2f} s, "
        f"fine-tune {summary['timings']['finetune_s']:.1f} s",
        markup=False,
    )
    if d := after.get("input_dependence"):  # dynamic models that choose channels per input (ManiDP)
        ui.out.print(
            f"input dependence over {d['test_inputs']} test images, mean of {len(d['layers'])} gated layers: "
            f"{100 * d['varying']:.1f}% of channels kept by some inputs and dropped by others; Jaccard distance "
            f"between two inputs' kept sets {d['jaccard']:.3f}",
            markup=False,
        )
    if s := after.get("static"):
        lat = "".join(f", latency b{b} {s[f'latency_b{b}_ms']:.3f} ms" for b in batches if f"latency_b{b}_ms" in s)
        ui.out.print(
            f"static_below={s['below']}: {s['removed_channels']} of {s['gated_channels']} gated channels removed "
            f"physically; the smaller model without gates: MACs {ui.human(s['macs'])}, params "
            f"{ui.human(s['params'])}{lat}; top-1 before removal {s['top1_before_removal']:.4f}",
            markup=False,
        )


def register(app: typer.Typer) -> None:
    app.command("prune")(ui.user_errors(prune))
