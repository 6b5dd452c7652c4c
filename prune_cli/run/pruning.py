"""One pruning run: load a trained model file, score with a criterion, select, remove channels, fine-tune,
evaluate before and after. `prune-cli prune` and `compare` call `run`; nothing here prints.

Data flow (DESIGN.md): model file -> channel groups -> criterion.run(context) -> selection -> surgery
-> fine-tune (same engine for every criterion) -> metrics.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prune_cli import engine, metrics, surgery
from prune_cli.api import (
    Allocation,
    CalibData,
    ChannelGroup,
    Context,
    Criterion,
    Dynamic,
    Plan,
    Result,
    Scores,
    Target,
    check_result,
    dynamic,
    get_criterion,
)  # fmt: skip
from prune_cli.config import build_dataclass
from prune_cli.data import splits as D
from prune_cli.errors import BadValue
from prune_cli.run import loading
from prune_cli.run.environment import machine
from prune_cli.selection import latency
from prune_cli.selection import plan as selection
from prune_cli.selection.defaults import SELECTION
from prune_cli.store.modelfile import save_model

# Training images the BatchNorm statistics are re-estimated on after removal (PruneJob.recalibrate_bn).
BN_IMAGES = 2048


@dataclass(frozen=True)
class PruneJob:
    """Everything that decides a pruning run's result (its hash keys run records in `compare`)."""

    criterion: str = "l1"
    options: Mapping[str, Any] = field(default_factory=dict)
    target: Target = field(default_factory=Target)
    mode: str = SELECTION.mode
    scope: str = SELECTION.scope
    round_to: int = SELECTION.round_to
    fast_widths: int = SELECTION.fast_widths  # batch size at which selection times widths (0: off)
    max_ratio: float = SELECTION.max_ratio
    calib_images: int = SELECTION.calib_images
    finetune_epochs: int = 0
    lr: float = 0.01
    batch_size: int = 128
    weight_decay: float = 5e-4
    seed: int = 0
    latency_batches: tuple[int, ...] = (1, 64)
    latency_seconds: float = 2.0  # timing budget per batch size and model
    # Re-estimate BatchNorm statistics on BN_IMAGES training images after surgery, every static criterion alike
    # ("before fine-tune" includes it); the base's same-setting top-1 too. `--[no-]bn-recalibration` and the
    # experiment's `bn_recalibration:`; the field keeps its first name, so that records made before keep their keys.
    recalibrate_bn: bool = True
    # A measured-latency target (latency.py): the fraction of the base's latency to remove at `latency_batch` (0:
    # off; `target` is then only what criteria that choose their own widths aim at). Runtime: what latency times.
    target_latency: float = 0.0
    latency_batch: int = 1
    runtime: str = "torch"

    def __post_init__(self):
        if self.finetune_epochs < 0 or self.fast_widths < 0 or self.calib_images < 1 or self.round_to < 1:
            raise BadValue("fine-tune epochs and fast-widths must be >= 0, calibration images and round-to >= 1")
        if not 0 < self.max_ratio < 1:
            raise BadValue(f"--max-ratio must be in (0, 1), got {self.max_ratio}")
        if self.mode not in ("uniform", "global"):
            raise BadValue(f"selection mode must be uniform or global, got {self.mode!r}")
        if self.scope not in ("internal", "all"):
            raise BadValue(f"scope must be internal or all, got {self.scope!r}")
        if self.target_latency:
            latency.check_latency_target(self.target_latency, self.latency_batch)
        if self.runtime not in latency.RUNTIMES:
            raise BadValue(f"--runtime must be one of {', '.join(latency.RUNTIMES)}, got {self.runtime!r}")
        self.finetune_config()  # refuse a bad learning rate or weight decay now, not after minutes of scoring

    def finetune_config(self) -> engine.TrainConfig:
        """The fine-tuning recipe (checked: finite positive learning rate, weight decay >= 0)."""
        return engine.TrainConfig(
            epochs=self.finetune_epochs, batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
            warmup_epochs=0.0, seed=self.seed,
        )  # fmt: skip


@dataclass
class Outcome:
    job: PruneJob
    dataset: str
    base_file: str
    model: nn.Module
    result_kind: str
    criterion_options: dict[str, Any]
    before: dict[str, Any]
    after: dict[str, Any]
    target_report: dict[str, Any]
    timings: dict[str, float]
    history: list[dict]
    widths: dict[str, int]
    input_shape: list[int]
    normalisation: dict[str, list[float]]

    def summary(self) -> dict[str, Any]:
        return {
            "criterion": self.job.criterion,
            "options": self.criterion_options,
            "result": self.result_kind,
            "target": f"-{100 * self.job.target_latency:.0f}% latency b{self.job.latency_batch}"
            if self.job.target_latency
            else f"-{100 * self.job.target.reduction:.0f}% {self.job.target.metric}",
            "dataset": self.dataset,
            "base_file": self.base_file,
            "finetune_epochs": self.job.finetune_epochs,
            "bn_recalibration": self.job.recalibrate_bn,
            "seed": self.job.seed,
            "before": self.before,
            "after": self.after,
            "target_report": self.target_report,
            "timings": self.timings,
            "widths": self.widths,
        }


def build_criterion(name: str, options: Mapping[str, Any]) -> Criterion:
    """The criterion `name` with its Options parsed strictly (unknown option -> did-you-mean, exit 2)."""
    cls = get_criterion(name)
    return cls(build_dataclass(cls.Options, options, where=f"{name} option"))


def make_context(
    model: nn.Module, groups: list[ChannelGroup], splits: D.Splits, criterion: Criterion, job: PruneJob,
    device: torch.device, log: Callable[[str], None] = lambda m: None, progress=None,
) -> Context:  # fmt: skip
    """The read-only context of a criterion: groups in scope, calibration data only if the criterion needs it."""
    calib: CalibData | None = None
    if criterion.needs & {"data", "labels", "grad", "train"}:
        calib = D.calib_data(splits, job.calib_images, device=device)
    example = loading.example_input(splits).to(device)
    return context(model, groups, example, splits.num_classes, calib, job, device, log, progress)


def context(
    model: nn.Module, groups: list[ChannelGroup], example: torch.Tensor, num_classes: int, calib: CalibData | None,
    job: PruneJob, device: torch.device, log: Callable[[str], None] = lambda m: None, progress=None,
) -> Context:  # fmt: skip
    """The criterion's context from tensors in memory (`make_context` reads them from a run's splits)."""
    extra = {"progress": progress} if progress is not None else {}
    return Context(
        model=model.eval(), groups=tuple(selection.groups_in_scope(groups, job.scope)), all_groups=tuple(groups),
        example_input=example, num_classes=num_classes, target=job.target, calib=calib, device=device,
        seed=job.seed, log=log, **extra,
    )  # fmt: skip


def score(criterion: Criterion, ctx: Context, job: PruneJob) -> Result:
    """The criterion's checked result on `ctx` (the first half of a run, shared by `run` and `prune_cli.prune`).

    A static criterion's target is checked for reach first, so that an impossible one fails before scoring."""
    if not criterion.dynamic:
        selection.check_reachable(ctx.cost_model(), list(ctx.groups), job.target, job.round_to, job.max_ratio)
    ctx.log(f"scoring {len(ctx.groups)} channel groups with {job.criterion}")
    torch.manual_seed(job.seed)
    return check_result(criterion.run(ctx), ctx.groups)


def remove(
    result: Result, ctx: Context, groups: list[ChannelGroup], job: PruneJob,
    by_latency: Callable[[Scores, Allocation | None], Any] | None = None,
) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, Any]]:  # fmt: skip
    """(the physically smaller model, kept channels per pruned group, target report) for a static result (the
    second half, shared likewise)."""
    keep, overrides, target_report = plan_from_result(result, ctx, job, by_latency)
    return surgery.prune(ctx.model, ctx.example_input, keep, overrides or None, groups=groups), keep, target_report


def plan_from_result(
    result: Result, ctx: Context, job: PruneJob, by_latency: Callable[[Scores, Allocation | None], Any] | None = None
) -> tuple[dict, dict, dict]:
    """(keep, overrides, target report) for a static result; Dynamic results never reach here. `by_latency`: the
    selection under a latency target (scores, allocation or None) -> Selection, if the job has one."""
    sel_args = dict(mode=job.mode, round_to=job.round_to, max_ratio=job.max_ratio, latency_batch=job.fast_widths)
    match result:
        case Scores():
            if by_latency is not None:
                report = by_latency(result, None)
                return report.keep, {}, report.as_dict()
            report = selection.select(ctx.model, ctx.example_input, list(ctx.groups), result, job.target, **sel_args)
            return report.keep, {}, report.as_dict()
        case Allocation(rank=rank):
            ranking = check_result(build_criterion(rank, {}).run(ctx), ctx.groups)
            if not isinstance(ranking, Scores):
                raise BadValue(f"allocation rank criterion {rank!r} must return scores")
            if by_latency is not None:
                report = by_latency(ranking, result)
                return report.keep, {}, report.as_dict()
            report = selection.select(
                ctx.model, ctx.example_input, list(ctx.groups), ranking, job.target, ratios=result, **sel_args
            )
            return report.keep, {}, report.as_dict()
        case Plan(keep=keep, overrides=overrides):
            report = selection.plan_report(ctx.model, ctx.example_input, keep, job.target)
            return dict(keep), dict(overrides), report.as_dict()
    raise BadValue(f"cannot make a keep plan from {type(result).__name__}")


def run(
    model_file: str | Path, job: PruneJob, *, dataset: str | None = None, data_dir: Path | None = None,
    device: torch.device | None = None, reporter: engine.Reporter | None = None,
    log: Callable[[str], None] = lambda m: None, time_latency: bool = True, trust: Collection[str] = (),
) -> Outcome:  # fmt: skip
    """Prune the model in `model_file` as `job` says; return the pruned model and before/after measurements
    (without latency if not `time_latency`: `compare` times the models of its worker processes later, one by one)."""
    device = device or engine.default_device()
    base, dataset, splits = loading.load_model_and_data(
        model_file, dataset, data_dir, seed=job.seed, device=device, trust=trust
    )
    criterion = build_criterion(job.criterion, job.options)
    before = _measure(base, splits, device, top1=_base_top1(model_file, dataset, base, splits, device))
    if job.recalibrate_bn and not criterion.dynamic:  # the base measured as the pruned model will be (a copy)
        before["top1_bn_recalibrated"] = _base_top1(model_file, dataset, base, splits, device, recalibrate=job.seed)
    example = loading.example_input(splits).to(device)

    t0 = time.perf_counter()
    groups = surgery.channel_groups(base, example)
    progress = reporter.counter if reporter is not None and hasattr(reporter, "counter") else None
    ctx = make_context(base, groups, splits, criterion, job, device, log, progress)
    result = score(criterion, ctx, job)
    score_s = time.perf_counter() - t0
    by_latency = None
    if job.target_latency and isinstance(result, (Scores, Allocation)):
        # Only now: a criterion that chooses its own widths ignores the latency target, so its reach must not be
        # timed (nor refuse the run); the criteria that use it pay the timing after scoring.
        by_latency = latency.selector(base, example, list(ctx.groups), splits, job, device, log)

    t1 = time.perf_counter()
    hooks = None
    if job.fast_widths:
        log(f"timing each layer's candidate widths at batch {job.fast_widths} (--fast-widths)"
            if isinstance(result, (Scores, Allocation))
            else f"--fast-widths ignored: {job.criterion} chooses its own widths")  # fmt: skip
    if job.target_latency and not isinstance(result, (Scores, Allocation)):
        log(f"--target-latency ignored: {job.criterion} chooses its own widths (it aimed at removing "
            f"{job.target.reduction:.0%} of the MACs instead)")  # fmt: skip
    if isinstance(result, Dynamic):
        pruned, hooks = result.model, result.hooks
        target_report = {"metric": "macs per input", "requested": job.target.reduction, "achieved": None}
        if result.config is not None:  # what the model file keeps, for the criterion's `rebuild` on load
            pruned.prune_cli_dynamic = {"criterion": job.criterion, **result.config}
        pruned.prune_cli_arch = base.prune_cli_arch
    else:
        pruned, _, target_report = remove(result, ctx, groups, job, by_latency)
    recalibrated = job.recalibrate_bn and not isinstance(result, Dynamic)
    if recalibrated:
        engine.recalibrate_batchnorm(pruned, splits, images=BN_IMAGES, device=device)
    else:
        before.pop("top1_bn_recalibrated", None)
    surgery_s = time.perf_counter() - t1
    # A method that prunes while it trains (training hooks: ManiDP's thresholds) has no pruned model before its
    # training: the gated model then is still the base, and its top-1 would read as the method's "before".
    trains = hooks is not None
    top1_before_ft = (
        None if trains and job.finetune_epochs else engine.evaluate(pruned, splits.test, splits, device=device).top1
    )

    history: list[dict] = []
    t2 = time.perf_counter()
    if job.finetune_epochs:
        cfg = job.finetune_config()
        log(f"fine-tuning {job.finetune_epochs} epochs at lr {job.lr}")
        history = engine.train(pruned, splits, cfg, hooks=hooks, device=device, reporter=reporter, log=log).history
    finetune_s = time.perf_counter() - t2
    static, static_model = None, None
    if isinstance(result, Dynamic) and callable(result.extra.get("finalize")):  # e.g. ManiDP's static_below
        top1_gated = engine.evaluate(pruned, splits.test, splits, device=device).top1
        pruned, static = result.extra["finalize"](pruned)
        static_model = static.pop("model", None)
        static["top1_before_removal"] = top1_gated

    after = _measure(pruned, splits, device, top1=None if job.finetune_epochs or static else top1_before_ft)
    if not trains:
        after["top1_before_finetune"] = top1_before_ft
    after["bn_recalibrated_images"] = min(BN_IMAGES, len(splits.train)) if recalibrated else 0
    if static is not None:
        after["static"] = static
    if time_latency:  # both now, taking turns: timed minutes apart, the CPU's drifting speed would enter the ratio
        lat_before, lat_after, *lat_static = metrics.time_side_by_side(
            [base, pruned, *([static_model] if static_model is not None else [])], splits,
            latency_batches=job.latency_batches, device=device, latency_seconds=job.latency_seconds,
            runtime=job.runtime,
        )  # fmt: skip
        before.update(lat_before)
        after.update(lat_after)
        if lat_static:  # the physically smaller model without its gates: what the static part alone runs at
            after["static"].update({k: v for k, v in lat_static[0].items() if k.startswith("latency")})
    if isinstance(result, Dynamic):
        target_report["achieved"] = 1 - after["macs"] / before["macs"]
        test_x = D.to_float(splits.test.x[:1024], splits, device=device)
        if layers := dynamic.input_dependence(pruned, test_x):  # per gated layer: how much the kept set varies
            after["input_dependence"] = {"test_inputs": len(test_x), **dynamic.summarise_dependence(layers),
                                         "layers": layers}  # fmt: skip
    return Outcome(
        job=job, dataset=dataset, base_file=str(model_file), model=pruned, result_kind=type(result).__name__,
        criterion_options=asdict(criterion.options), before=before, after=after, target_report=target_report,
        timings={"score_s": score_s, "surgery_s": surgery_s, "finetune_s": finetune_s}, history=history,
        widths=_widths(pruned), input_shape=list(splits.train.x.shape[1:]),
        normalisation=loading.normalisation(splits),
    )  # fmt: skip


def save(outcome: Outcome, path: Path) -> Path:
    """Write the pruned model with its provenance (criterion, options, target, metrics, machine)."""
    s = outcome.summary()
    return save_model(
        outcome.model.cpu(), path, kind="pruned", dataset=outcome.dataset, input_shape=outcome.input_shape,
        criterion=s["criterion"], options=s["options"], target=s["target_report"], seed=outcome.job.seed,
        metrics=s["after"], base=s["before"], base_file=outcome.base_file, history=outcome.history,
        machine=machine(), normalisation=outcome.normalisation,
    )  # fmt: skip


def _measure(model: nn.Module, splits: D.Splits, device: torch.device, top1: float | None = None) -> dict[str, Any]:
    """Top-1 on the test split (unless already known), params and MACs (latency: `metrics.time_side_by_side`)."""
    out = {"top1": top1 if top1 is not None else engine.evaluate(model, splits.test, splits, device=device).top1}
    out.update(metrics.measure(model, splits, latency_batches=(), device=device))
    return out


# The base model's test top-1 is deterministic: evaluate it once per process and file, not once per grid cell.
# Latency is still measured in every run, taking turns with the pruned model's, since the machine's speed drifts.
_BASE_TOP1: dict[tuple, float] = {}


def _base_top1(
    model_file: str | Path, dataset: str, base: nn.Module, splits: D.Splits, device: torch.device,
    recalibrate: int | None = None,
) -> float:  # fmt: skip
    """The base's test top-1 with its own BatchNorm statistics, or, with `recalibrate` (the run's seed, which picks
    the training images), with them re-estimated on the images a pruned model's are (on a copy: `base` is kept)."""
    stat = Path(model_file).stat()
    key = (
        str(Path(model_file).resolve()),
        stat.st_size,
        stat.st_mtime_ns,
        dataset,
        splits.mean,
        splits.std,
        str(device),
        recalibrate,
    )
    if key not in _BASE_TOP1:
        model = base
        if recalibrate is not None:
            model = copy.deepcopy(base)
            engine.recalibrate_batchnorm(model, splits, images=BN_IMAGES, device=device)
        _BASE_TOP1[key] = engine.evaluate(model, splits.test, splits, device=device).top1
    return _BASE_TOP1[key]


def _widths(model: nn.Module) -> dict[str, int]:
    """Output width of every conv and linear layer (a hidden linear layer is prunable too)."""
    return {
        n: m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
        for n, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    }
