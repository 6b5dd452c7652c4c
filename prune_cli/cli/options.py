"""Shared options: Annotated aliases, so that a flag has the same name and help in every command, and the groups of
options several commands take together (`RunOptions`, `SelectOptions`, given to a command by `grouped`)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from prune_cli.selection.defaults import SELECTION

if TYPE_CHECKING:
    import torch

F = TypeVar("F", bound=Callable[..., Any])

DATA = "Data"
TRAIN = "Training"
PRUNE = "Pruning"
OUTPUT = "Output"
RUN = "Run"

Model = Annotated[
    str,
    typer.Option(
        "--model", "-m", help="Zoo name (`prune-cli list models`), torchvision:NAME or package.module:factory."
    ),
]
Weights = Annotated[Path | None, typer.Option("--weights", help="Initial weights (.safetensors or a .pt state dict).")]
Dataset = Annotated[
    str | None,
    typer.Option("--dataset", "-d", help="Dataset name (see `prune-cli list datasets`).", rich_help_panel=DATA),
]
DataDir = Annotated[
    Path | None, typer.Option("--data-dir", help="Folder holding the dataset files.", rich_help_panel=DATA)
]
Split = Annotated[str, typer.Option(help="test or val.", rich_help_panel=DATA)]
Seed = Annotated[int, typer.Option("--seed", help="Seed for splits, initialisation and sampling.", rich_help_panel=RUN)]
Device = Annotated[
    str | None, typer.Option("--device", help="cpu, cuda, cuda:1 (default: cuda if available).", rich_help_panel=RUN)
]
Threads = Annotated[
    int | None, typer.Option("--threads", help="CPU threads for torch (default: torch's choice).", rich_help_panel=RUN)
]
Epochs = Annotated[int, typer.Option("--epochs", help="Training epochs.", rich_help_panel=TRAIN)]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Training batch size.", rich_help_panel=TRAIN)]
Lr = Annotated[float, typer.Option("--lr", help="Peak learning rate (cosine schedule).", rich_help_panel=TRAIN)]
Json = Annotated[bool, typer.Option("--json", help="Print JSON to stdout instead of a table.", rich_help_panel=OUTPUT)]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Only results, no progress or messages.")]
OutFile = Annotated[Path, typer.Option("--out", "-o", help="Output model file (.safetensors).", rich_help_panel=OUTPUT)]
LatencyBatches = Annotated[
    str, typer.Option("--latency-batches", help="Batch sizes for latency, comma separated.", rich_help_panel=OUTPUT)
]

# Pruning: the same flags for `prune` and `score`.
TargetMacs = Annotated[
    float | None, typer.Option(help="Fraction of MACs to remove (0.5 = half).", rich_help_panel=PRUNE)
]
TargetParams = Annotated[float | None, typer.Option(help="Fraction of parameters to remove.", rich_help_panel=PRUNE)]
Mode = Annotated[str, typer.Option(help="uniform or global selection.", rich_help_panel=PRUNE)]
Scope = Annotated[str, typer.Option(help="internal or all (ResNet residual groups).", rich_help_panel=PRUNE)]
RoundTo = Annotated[int, typer.Option(help="Keep a multiple of this many channels.", rich_help_panel=PRUNE)]
FastWidths = Annotated[
    int,
    typer.Option(
        help="Round each group down to a width that runs faster than every wider one on this machine at this batch "
        "size; the other groups are pruned less to meet the target (times every layer: seconds to a minute; 0: off).",
        rich_help_panel=PRUNE,
    ),
]
TargetLatency = Annotated[
    float | None,
    typer.Option(
        help="Fraction of the measured latency to remove on this device at --latency-batch (0.3 = 30% faster "
        "forward passes); instead of --target-macs/--target-params. Times every layer at candidate widths (cached).",
        rich_help_panel=PRUNE,
    ),
]
LatencyBatch = Annotated[
    int, typer.Option(help="Batch size at which --target-latency is timed and met.", rich_help_panel=PRUNE)
]
Runtime = Annotated[
    str,
    typer.Option(
        help="What latency is timed with: torch or onnxruntime (needs the extra: pip install 'prune-cli\\[onnx]').",
        rich_help_panel=OUTPUT,
    ),
]
MaxRatio = Annotated[float, typer.Option(help="Most a group may lose.", rich_help_panel=PRUNE)]
TrustFactory = Annotated[
    list[str] | None,
    typer.Option(
        "--trust-factory",
        help="Let a model file be built by this package.module:factory of yours: it is imported and run, so name only "
        "code you trust (repeatable). Without it a file may name only a zoo model or a torchvision classifier.",
        rich_help_panel=RUN,
    ),
]
CalibImages = Annotated[int, typer.Option(help="Calibration images for scoring.", rich_help_panel=PRUNE)]
BnRecalibration = Annotated[
    bool,
    typer.Option(
        "--bn-recalibration/--no-bn-recalibration",
        help="Re-estimate BatchNorm statistics on 2,048 training images after removal (static criteria); the "
        "original's top-1 is then also given with its statistics re-estimated on the same images.",
        rich_help_panel=PRUNE,
    ),
]


# ------------------------------------------------------------------------------------------------ option groups
@dataclass(frozen=True)
class RunOptions:
    """Where and how a command runs: the options every command shares, declared once (see `grouped`)."""

    latency_batches: LatencyBatches = "1,64"
    runtime: Runtime = "torch"
    seed: Seed = 0
    trust_factory: TrustFactory = None
    device: Device = None
    threads: Threads = None
    json: Json = False
    quiet: Quiet = False

    @property
    def trust(self) -> tuple[str, ...]:
        """The user factories a model file may name (`modelfile.load_model`)."""
        return tuple(self.trust_factory or ())

    def batches(self) -> list[int]:
        """--latency-batches as batch sizes (a bad list is a user error)."""
        return parse_batches(self.latency_batches)

    def setup(self, device: str | None = None) -> torch.device:
        """Seed torch, set the threads and resolve the device (`device` overrides --device)."""
        from prune_cli.run.environment import setup_runtime

        return setup_runtime(device or self.device, self.threads, self.seed)


@dataclass(frozen=True)
class SelectOptions:
    """How scores become a keep-plan: the selection options `prune` and `score` share."""

    mode: Mode = SELECTION.mode
    scope: Scope = SELECTION.scope
    round_to: RoundTo = SELECTION.round_to
    fast_widths: FastWidths = SELECTION.fast_widths
    max_ratio: MaxRatio = SELECTION.max_ratio
    calib_images: CalibImages = SELECTION.calib_images


def grouped(**groups: str) -> Callable[[F], F]:
    """Give a command the options of groups, declared once above, in place of one parameter per group.

    Each keyword names a parameter of the command annotated with a group (`RunOptions`, `SelectOptions`); its value
    lists, space separated, the group's options the command offers, in the order its --help shows them. The command
    then receives one group value (the options it does not offer at their defaults), and `ui.quiet` is set first.

        @grouped(run="seed device threads json quiet")
        def train(model: Model = "resnet20", run: RunOptions = RunOptions()) -> None: ...
    """

    def wrap(fn: F) -> F:
        signature = inspect.signature(fn, eval_str=True)
        params: list[inspect.Parameter] = []
        offered: dict[str, tuple[type, list[str]]] = {}
        for p in signature.parameters.values():
            if p.name not in groups:
                params.append(p)
                continue
            group, names = p.annotation, groups[p.name].split()
            declared = typing.get_type_hints(group, include_extras=True)
            defaults = {f.name: f.default for f in dataclasses.fields(group)}
            params += [inspect.Parameter(n, p.kind, annotation=declared[n], default=defaults[n]) for n in names]
            offered[p.name] = (group, names)

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            for name, (group, names) in offered.items():
                kwargs[name] = group(**{n: kwargs.pop(n) for n in names})
            run = next((v for v in kwargs.values() if isinstance(v, RunOptions)), None)
            if run is not None:
                from prune_cli.cli import ui

                ui.quiet = run.quiet
            return fn(**kwargs)

        command.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command  # type: ignore[return-value]

    return wrap


def parse_batches(text: str) -> list[int]:
    """A comma-separated list of batch sizes (--latency-batches) as integers; a bad list is a user error."""
    from prune_cli.errors import BadValue

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BadValue(f"latency batches must be integers separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise BadValue(f"latency batches must be positive integers, got {text!r}")
    return values
