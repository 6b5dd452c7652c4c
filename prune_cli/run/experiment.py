"""Experiments: a strict YAML file -> a frozen `Experiment` -> the grid of cells (criterion x target x seed).

    name: quickstart
    dataset: digits
    base: {model: vgg11, epochs: 6}        # or {file: base.safetensors}
    criteria: [l1, {name: sensitivity, options: {trials: 1}}]    # or: all
    targets: [0.3, 0.5]                    # fraction of MACs to remove (dynamic methods: per input)
    latency_targets: [0.3]                 # optional: fraction of the base's measured latency to remove...
    latency_batch: 1                       # ...at this batch size (`prune --target-latency`): its own leaderboard
    seeds: [0, 1]
    finetune: {epochs: 1, lr: 0.01}        # identical for every criterion
    bn_recalibration: true                 # re-estimate BatchNorm statistics after removal (the default)
    executor: local                        # or ray: where the cells run (never part of a cell's key)
    shared_dir: /mnt/shared                # optional, ray only: a folder all nodes mount, for the tasks' files
    runtime: torch                         # or onnxruntime: what latency is timed with (extra prune-cli[onnx])

Unknown keys are errors with a suggestion (`prune_cli.config`); values are converted to the declared types, so
CLI overrides (strings) and YAML values give the same experiment. Each cell is a `pruning.PruneJob`; its key
is the hash of everything that decides its result, and keys the run record in the store.

A latency target is a cell of its own after the MACs cells (criterion x latency target x seed), pruned as `prune
--target-latency F --latency-batch B`: selection times the base against candidate plans inside the cell, so a grid
with latency targets belongs on an otherwise idle machine with `--jobs 1`. `targets: []` leaves only those cells.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prune_cli.api import Target
from prune_cli.config import build_dataclass, check_seed, load_yaml
from prune_cli.engine import TrainConfig
from prune_cli.errors import BadConfig, BadValue
from prune_cli.run.pruning import PruneJob, build_criterion
from prune_cli.selection.defaults import SELECTION

EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class BaseSpec:
    """The model every criterion prunes: a model `file`, or a zoo `model` trained here once (and reused)."""

    file: str | None = None
    model: str | None = None
    epochs: int = 30
    lr: float = 0.1
    batch_size: int = 128
    seed: int = 0

    def __post_init__(self):
        if (self.file is None) == (self.model is None):
            raise BadConfig("base: give exactly one of `file` (a trained model file) or `model` (train it here)")


@dataclass(frozen=True)
class FinetuneSpec:
    epochs: int = 0
    lr: float = 0.01
    batch_size: int = 128
    weight_decay: float = 5e-4


@dataclass(frozen=True)
class CriterionSpec:
    """One leaderboard entry: a criterion and its options (`label` tells two option sets apart)."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    label: str | None = None

    @property
    def title(self) -> str:
        return self.label or self.name


@dataclass(frozen=True)
class Experiment:
    name: str
    base: BaseSpec
    criteria: tuple[CriterionSpec, ...]
    dataset: str = "digits"
    data_dir: str | None = None
    targets: tuple[float, ...] = (0.5,)
    latency_targets: tuple[float, ...] = ()  # fractions of the base's measured latency to remove (at latency_batch)
    latency_batch: int = 1
    metric: str = "macs"
    seeds: tuple[int, ...] = (0,)
    finetune: FinetuneSpec = field(default_factory=FinetuneSpec)
    scope: str = SELECTION.scope
    mode: str = SELECTION.mode
    round_to: int = SELECTION.round_to
    fast_widths: int = SELECTION.fast_widths
    max_ratio: float = SELECTION.max_ratio
    calib_images: int = SELECTION.calib_images
    latency_batches: tuple[int, ...] = (1, 64)
    latency_seconds: float = 2.0
    bn_recalibration: bool = True  # re-estimate BatchNorm statistics after removal (PruneJob.recalibrate_bn)
    out: str | None = None
    notes: str = ""
    executor: str = "local"  # where cells run (`local` processes or `ray` tasks): not in any cell's config or key
    shared_dir: str | None = None  # ray: a folder at the same path on every node, for the tasks' files (not in keys)
    runtime: str = "torch"  # what latency is timed with (torch or onnxruntime); in a cell's key only when not torch

    @property
    def out_dir(self) -> Path:
        return Path(self.out or f"runs/{self.name}")

    def cells(self) -> list[Cell]:
        """Every (criterion, target, seed), criteria in the order given; then every (criterion, latency target,
        seed). The MACs cells come first and are built as before latency targets existed: their keys are unchanged.
        """
        return [
            Cell(spec, self.job(spec, target, seed))
            for spec in self.criteria for target in self.targets for seed in self.seeds
        ] + [
            Cell(spec, self.job(spec, target, seed, latency=True))
            for spec in self.criteria for target in self.latency_targets for seed in self.seeds
        ]  # fmt: skip

    def job(self, spec: CriterionSpec, target: float, seed: int, latency: bool = False) -> PruneJob:
        """The cell's job; with `latency`, `target` is a fraction of the measured latency at `latency_batch` (and the
        MACs fraction that criteria choosing their own widths aim at instead, as in `prune --target-latency`)."""
        ft = self.finetune
        batches = self.latency_batches
        extra: dict[str, Any] = {}
        if latency:  # the batch the target is at is always timed for the leaderboard, next to the others
            batches = tuple(dict.fromkeys([*batches, self.latency_batch]))
            extra = {"target_latency": target, "latency_batch": self.latency_batch}
        return PruneJob(
            criterion=spec.name, options=dict(spec.options),
            target=Target("macs" if latency else self.metric, target),  # type: ignore[arg-type]
            mode=self.mode, scope=self.scope, round_to=self.round_to, fast_widths=self.fast_widths,
            max_ratio=self.max_ratio,
            calib_images=self.calib_images, finetune_epochs=ft.epochs, lr=ft.lr, batch_size=ft.batch_size,
            weight_decay=ft.weight_decay, seed=seed, latency_batches=batches,
            latency_seconds=self.latency_seconds, recalibrate_bn=self.bn_recalibration, runtime=self.runtime, **extra,
        )  # fmt: skip


@dataclass(frozen=True)
class Cell:
    spec: CriterionSpec
    job: PruneJob

    @property
    def target_text(self) -> str:
        """The cell's target for messages: `target 0.3` (MACs or params) or `latency target 0.3 at batch 1`."""
        if self.job.target_latency:
            return f"latency target {self.job.target_latency:g} at batch {self.job.latency_batch}"
        return f"target {self.job.target.reduction:g}"

    def config(self, dataset: str, data_dir: str | None, base_digest: str) -> dict[str, Any]:
        """Everything that decides the cell's result, as plain JSON (what the key hashes)."""
        job = asdict(self.job)
        job["latency_batches"] = list(job["latency_batches"])
        if not job["fast_widths"]:  # off: the keys of records made before the option existed stay valid
            del job["fast_widths"]
        for name, off in (("target_latency", 0.0), ("latency_batch", 1), ("runtime", "torch")):  # likewise
            if job.get(name) == off:
                del job[name]
        return {"job": job, "dataset": dataset, "data_dir": data_dir, "base_sha256": base_digest}


def config_key(config: dict[str, Any]) -> str:
    """A short stable hash of a resolved config (canonical JSON, sorted keys)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------- loading
def load_experiment(path: str | Path, overrides: dict[str, Any] | None = None) -> Experiment:
    """Read a YAML experiment, apply CLI `overrides` (top-level keys; None values ignored), validate strictly."""
    path = Path(path)
    if not path.is_file():
        raise BadValue(f"experiment file {path} does not exist")
    raw = load_yaml(path)
    if not isinstance(raw, dict):
        raise BadConfig(f"{path} must hold a mapping of experiment keys")
    raw.setdefault("name", path.stem)
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return parse_experiment(raw)


def parse_experiment(raw: dict[str, Any]) -> Experiment:
    values = dict(raw)
    if "base" not in values or "criteria" not in values:
        raise BadConfig("an experiment needs `base` (file or model to train) and `criteria`")
    values["base"] = _section(BaseSpec, values["base"], "base")
    values["finetune"] = _section(FinetuneSpec, values.get("finetune", {}), "finetune")
    values["criteria"] = tuple(_criteria(values["criteria"]))
    exp = build_dataclass(Experiment, values, where="experiment key")
    for t in exp.targets:
        Target(exp.metric, t)  # type: ignore[arg-type]  (validates range and metric)
    for t in exp.latency_targets:
        if not 0 < t < 1:  # also NaN
            raise BadConfig(f"`latency_targets` must be fractions in (0, 1) of the measured latency to remove, got {t}")
    if exp.latency_batch < 1:
        raise BadConfig(f"`latency_batch` must be a batch size >= 1, got {exp.latency_batch}")
    if exp.executor not in EXECUTORS:
        raise BadConfig(f"`executor` must be one of {', '.join(EXECUTORS)}, got {exp.executor!r}")
    if not (exp.targets or exp.latency_targets) or not exp.seeds:
        raise BadConfig("an experiment needs at least one target (or latency target) and one seed")
    for seed in (*exp.seeds, exp.base.seed):
        check_seed(seed, "seeds")
    if not exp.latency_batches or min(exp.latency_batches) < 1:
        raise BadConfig(f"`latency_batches` must be positive batch sizes, got {list(exp.latency_batches)}")
    if not (math.isfinite(exp.latency_seconds) and exp.latency_seconds > 0):
        raise BadConfig(f"`latency_seconds` must be a positive number of seconds, got {exp.latency_seconds}")
    # The training recipes are checked now (finite positive lr, weight decay >= 0...), not when a cell first trains.
    b, ft = exp.base, exp.finetune
    TrainConfig(epochs=b.epochs, lr=b.lr, batch_size=b.batch_size, seed=b.seed)
    TrainConfig(epochs=ft.epochs, lr=ft.lr, batch_size=ft.batch_size, weight_decay=ft.weight_decay)
    titles = [c.title for c in exp.criteria]
    if len(set(titles)) != len(titles):
        raise BadConfig(f"criteria entries must differ (give a `label`): {titles}")
    exp.cells()  # PruneJob validates mode, scope, epochs...
    return exp


def _section(cls, value: Any, where: str):
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise BadConfig(f"`{where}` must be a mapping")
    return build_dataclass(cls, value, where=f"{where} key")


def _criteria(value: Any) -> list[CriterionSpec]:
    """`all`, a comma-separated string, or a list of names / {name, options, label} mappings."""
    from prune_cli.api import list_criteria

    if isinstance(value, str):
        value = list_criteria() if value.strip() == "all" else [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or not value:
        raise BadConfig("`criteria` must be `all` or a non-empty list")
    specs = []
    for item in value:
        spec = _section(CriterionSpec, {"name": item} if isinstance(item, str) else item, "criteria entry")
        build_criterion(spec.name, spec.options)  # unknown criterion or option: did-you-mean now, not mid-grid
        specs.append(spec)
    return specs
