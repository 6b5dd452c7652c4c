"""The conformance check every criterion runs, built-in or third-party, and the context helper its tests use.

`make_context` builds the read-only `Context` a criterion sees in a real run (channel groups from one recorded
forward pass, the selection scope applied) from a model and an example input, with calibration data made up or
given. `check_criterion` runs a criterion on it and checks the properties every criterion owes the rest of the
pipeline:

1. its result passes `check_result` (shapes, indices, at least one channel kept per group);
2. the model it was given is untouched (state dict, module classes, the calibration images too);
3. the same seed gives the same result (scores, ratios, plans, a dynamic model's weights and outputs);
4. where it ranks channels (`Scores`), a planted dead channel (a producer's filter zeroed with its BatchNorm's
   gamma and beta, so the channel is 0 for every input) ranks last in its group;
5. a `Plan` applies (surgery accepts its indices and weight overrides); an `Allocation` names a registered rank
   criterion; a `Dynamic` model shares no tensor with the base, runs on the example input, executes at most the
   base's MACs per input, and rebuilds from its config (`rebuild`) to the same outputs.

A third-party criterion runs the same check in its own test:

    from prune_cli.testing import check_criterion
    from my_package.criteria import MyCriterion

    def test_my_criterion_conforms():
        check_criterion(MyCriterion)                 # prune-cli's ResNet-20 (random weights), (1, 3, 16, 16) input
        check_criterion(MyCriterion, my_model(), torch.randn(1, 3, 32, 32), options={"alpha": 0.1})

A failed property raises `ConformanceError` (an AssertionError, so pytest shows it as a failed assertion); a
criterion that refuses a model with a `PruneCliError` (one line, exit 2) lets that error through.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from prune_cli.api import (
    Allocation,
    CalibData,
    Context,
    Criterion,
    Dynamic,
    Plan,
    Result,
    Scores,
    Target,
    check_result,
    get_criterion,
)
from prune_cli.errors import BadValue, PruneCliError

# Calibration images made up when a criterion needs data and none is given: enough for a per-class statistic on a
# tiny model, few enough that a sweep over them takes well under a second.
SYNTHETIC_IMAGES = 64


# Keys of a result's mappings (`extra`) that hold wall times, which no seed repeats: not compared.
TIMING_SUFFIXES = ("_s", "_seconds", "_ms")


class ConformanceError(AssertionError):
    """A criterion broke a property that the rest of the pipeline relies on."""


# ------------------------------------------------------------------------------------------------- context
def synthetic_calib(model: nn.Module, example_input: Tensor, n: int = SYNTHETIC_IMAGES, seed: int = 0) -> CalibData:
    """`n` Gaussian images shaped like `example_input` (1, C, H, W), labelled by the model's own predictions.

    The model then scores 100% on them, so damage shows as an accuracy drop. Where its predictions cover fewer
    than two classes (a degenerate random model), the labels cycle through the classes instead, so that a
    criterion that separates classes has two to separate. Returns x (n, C, H, W), y (n,) int64.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *example_input.shape[1:], generator=g).to(example_input.device)
    with torch.no_grad():
        logits = _eval_forward(model, x)
    y = logits.argmax(1).cpu()
    if y.unique().numel() < 2:
        y = torch.arange(n) % max(2, logits.shape[1])
        y = y[torch.randperm(n, generator=g)]
    return CalibData(x, y.to(torch.int64).to(example_input.device))


def make_context(
    model: nn.Module,
    example_input: Tensor | None = None,
    *,
    target: float | Target = 0.5,
    calib: CalibData | tuple[Tensor, Tensor] | Tensor | int | None = None,
    seed: int = 0,
    scope: str = "internal",
    only: Collection[str] | None = None,
    num_classes: int | None = None,
    device: torch.device | str | None = None,
    log: Callable[[str], None] | None = None,
    progress: Callable[[str, int], Callable[[int], None]] | None = None,
) -> Context:
    """The context a criterion sees in a real run, for `model` on `example_input` (1, C, H, W).

    target: a Target, or a float: the fraction of the MACs to remove. calib: a CalibData; an (x, y) pair; images x
    (N, C, H, W) labelled by the model's predictions; a number of Gaussian images to make up (`synthetic_calib`); or
    None (no calibration data). example_input defaults to the first calibration image. scope: "internal" (groups
    that feed no residual sum) or "all"; `only` narrows the groups in scope to those ids. num_classes defaults to
    the width of the model's output. The model is put in eval mode (no tensor of it changes).
    """
    from prune_cli.selection.plan import groups_in_scope
    from prune_cli.surgery import channel_groups

    if example_input is None:
        images = calib.x if isinstance(calib, CalibData) else calib[0] if isinstance(calib, tuple) else calib
        if not isinstance(images, Tensor):
            raise BadValue("make_context needs an example input (1, C, H, W) or calibration images")
        example_input = images[:1]
    if example_input.dim() != 4 or example_input.shape[0] != 1:
        raise BadValue(f"the example input must be one image (1, C, H, W), got shape {tuple(example_input.shape)}")
    model.eval()
    if num_classes is None:
        with torch.no_grad():
            num_classes = int(model(example_input).shape[1])
    if isinstance(calib, int):
        calib = synthetic_calib(model, example_input, calib, seed)
    elif isinstance(calib, Tensor):
        with torch.no_grad():
            calib = CalibData(calib, _eval_forward(model, calib).argmax(1))
    elif isinstance(calib, tuple):
        calib = CalibData(*calib)
    groups = channel_groups(model, example_input)
    in_scope = [g for g in groups_in_scope(groups, scope) if only is None or g.id in only]
    extra: dict[str, Any] = {}
    if log is not None:
        extra["log"] = log
    if progress is not None:
        extra["progress"] = progress
    return Context(
        model=model, groups=tuple(in_scope), all_groups=tuple(groups), example_input=example_input,
        num_classes=num_classes, target=target if isinstance(target, Target) else Target("macs", float(target)),
        calib=calib, device=torch.device(device) if device is not None else example_input.device, seed=seed, **extra,
    )  # fmt: skip


# -------------------------------------------------------------------------------------------------- check
@dataclass
class CheckReport:
    """What `check_criterion` ran and found. `planted`: group id -> the dead channel's index (Scores only)."""

    criterion: str
    result: Result
    checks: list[str] = field(default_factory=list)
    planted: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def default_model() -> tuple[nn.Module, Tensor]:
    """prune-cli's ResNet-20 (random weights, non-trivial BatchNorm statistics) and a (1, 3, 16, 16) input."""
    import models

    torch.manual_seed(0)
    model = randomise_bn(models.create_model("resnet20", num_classes=10, in_channels=3))
    return model, torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def check_criterion(
    criterion: str | type[Criterion] | Criterion,
    model: nn.Module | None = None,
    example_input: Tensor | None = None,
    *,
    options: Mapping[str, Any] | None = None,
    calib: CalibData | tuple[Tensor, Tensor] | Tensor | int | None = None,
    target: float | Target = 0.5,
    seed: int = 0,
    scope: str = "internal",
    dead_channel: bool = True,
) -> CheckReport:
    """Run `criterion` on `model` and check the properties in this module's docstring; raise ConformanceError.

    criterion: a registered name, a Criterion class (built with `options`, strictly parsed as on the command line)
    or an instance. model, example_input: default `default_model()`. calib: as in `make_context`; by default
    `SYNTHETIC_IMAGES` made-up images when the criterion declares it needs data. The criterion runs three times
    (twice on the model, once on a copy with dead channels planted), so pass cheap options for one that trains.
    `dead_channel=False` skips property 4 (for a score that is by design not monotone in a channel's output).
    Returns a CheckReport; a PruneCliError the criterion raises (a model it does not support) passes through.
    """
    t0 = time.perf_counter()
    crit = _build(criterion, options)
    name = getattr(crit, "name", type(crit).__name__)
    if model is None:
        model, default_input = default_model()
        example_input = default_input if example_input is None else example_input
    if example_input is None:
        raise BadValue("check_criterion needs an example input (1, C, H, W) for a model it is given")
    if calib is None and crit.needs & {"data", "labels", "grad", "train"}:
        calib = SYNTHETIC_IMAGES
    ctx = make_context(model, example_input, target=target, calib=calib, seed=seed, scope=scope)
    calib = ctx.calib  # the same images for every run below

    def fresh(m: nn.Module) -> Context:
        return make_context(m, example_input, target=target, calib=calib, seed=seed, scope=scope)

    state, classes = _snapshot(model), _classes(model)
    calib_copy = (calib.x.clone(), calib.y.clone()) if calib is not None else None
    result = crit.run(ctx)
    report = CheckReport(name, result)
    _checked(result, ctx.groups, name)
    report.checks.append("check_result")

    _require(
        _state_diff(state, _snapshot(model)) is None,
        f"{name} changed the model it was given: {_state_diff(state, _snapshot(model))}",
    )
    _require(classes == _classes(model), f"{name} replaced or re-classed modules of the model it was given")
    if calib_copy is not None:
        _require(
            torch.equal(calib_copy[0], calib.x) and torch.equal(calib_copy[1], calib.y),
            f"{name} changed the calibration images or labels",
        )
    report.checks.append("model untouched")

    again = _checked(_build(criterion, options).run(fresh(model)), ctx.groups, name)
    difference = _difference(result, again, example_input)
    _require(difference is None, f"{name}: the same seed gave a different result ({difference})")
    report.checks.append("same seed repeats")

    match result:
        case Scores():
            if dead_channel:
                report.planted = _check_dead_channel(criterion, options, model, ctx, fresh, name)
                report.checks.append("dead channel ranks last")
        case Allocation(rank=rank):
            try:
                get_criterion(rank)
            except Exception as exc:
                raise ConformanceError(f"{name}: its allocation ranks channels by {rank!r}: {exc}") from exc
            report.checks.append("rank criterion registered")
        case Plan(keep=keep, overrides=overrides):
            _check_plan(model, example_input, keep, overrides, name)
            report.checks.append("plan applies")
        case Dynamic():
            _check_dynamic(crit, result, model, example_input, name)
            report.checks.append("dynamic model runs, costs no more, rebuilds")
    report.seconds = time.perf_counter() - t0
    return report


def plant_dead_channels(model: nn.Module, groups: Collection, channel: int | None = None) -> dict[str, int]:
    """Make one channel of each group dead, in place: every producer's filter and bias and every BatchNorm's gamma
    and beta at that channel set to 0 (running mean too, for a BatchNorm without affine), so its output is 0 for
    every input. Channel `channel`, default the middle one; groups of fewer than 3 channels are left alone (the
    dead one must have live ones to rank below). Returns {group id: dead channel}."""
    modules = dict(model.named_modules())
    planted = {}
    with torch.no_grad():
        for g in groups:
            if g.size < 3 or not g.producers:
                continue
            c = g.size // 2 if channel is None else channel
            for m in g.members:
                module, i = modules[m.module], m.offset + c
                if m.kind in ("conv_out", "linear_out", "depthwise"):
                    module.weight[i] = 0
                    if module.bias is not None:
                        module.bias[i] = 0
                elif m.kind == "bn":
                    if module.weight is not None:
                        module.weight[i] = 0
                        module.bias[i] = 0
                    else:
                        module.running_mean[i] = 0
            planted[g.id] = c
    return planted


# ------------------------------------------------------------------------------------------------ helpers
def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (fresh ones are the identity), in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


def _build(criterion: str | type[Criterion] | Criterion, options: Mapping[str, Any] | None) -> Criterion:
    if isinstance(criterion, Criterion):
        if options:
            raise BadValue("pass options with a criterion's name or class, not with an instance")
        return copy.deepcopy(criterion)  # a run may keep state on the instance (reports): each run gets its own
    cls = get_criterion(criterion) if isinstance(criterion, str) else criterion
    if not (isinstance(cls, type) and issubclass(cls, Criterion)):
        raise BadValue(f"expected a criterion name, class or instance, got {criterion!r}")
    from prune_cli.config import build_dataclass

    return cls(build_dataclass(cls.Options, dict(options or {}), where=f"{getattr(cls, 'name', cls)} option"))


def _checked(result: Result, groups, name: str) -> Result:
    try:
        return check_result(result, groups)
    except PruneCliError as exc:  # here the criterion's result, not the user, is at fault
        raise ConformanceError(f"{name}: its result fails check_result: {exc}") from exc


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConformanceError(message)


def _eval_forward(model: nn.Module, x: Tensor) -> Tensor:
    was_training = model.training
    model.eval()
    try:
        return model(x)
    finally:
        model.train(was_training)


def _snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _classes(model: nn.Module) -> list[tuple[str, type]]:
    return [(n, type(m)) for n, m in model.named_modules()]


def _state_diff(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> str | None:
    if a.keys() != b.keys():
        return f"state dict keys differ: {sorted(set(a) ^ set(b))[:5]}"
    for k in a:
        if a[k].shape != b[k].shape or not torch.equal(a[k], b[k]):
            return f"{k} changed"
    return None


def _difference(a: object, b: object, example_input: Tensor, where: str = "result") -> str | None:
    """Where two results (or parts of them) differ, or None. Callables (hooks, finalizers) and wall times (keys
    ending in TIMING_SUFFIXES) are not compared."""
    if type(a) is not type(b):
        return f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, Tensor):
        if a.shape != b.shape or not torch.equal(a, b):
            return f"{where} differs"
        return None
    if isinstance(a, nn.Module):
        diff = _state_diff(_snapshot(a), _snapshot(b))
        if diff is not None:
            return f"{where}: {diff}"
        with torch.no_grad():
            if not torch.equal(_eval_forward(a, example_input), _eval_forward(b, example_input)):
                return f"{where}: outputs on the example input differ"
        return None
    if isinstance(a, (Scores, Allocation, Plan, Dynamic)):
        for f in a.__dataclass_fields__:
            if f == "hooks":
                continue
            if (diff := _difference(getattr(a, f), getattr(b, f), example_input, f"{where}.{f}")) is not None:
                return diff
        return None
    if isinstance(a, Mapping):
        if a.keys() != b.keys():
            return f"{where}: keys differ ({sorted(map(str, set(a) ^ set(b)))[:5]})"
        for k in a:
            if isinstance(k, str) and k.endswith(TIMING_SUFFIXES):  # wall times differ from run to run
                continue
            if (diff := _difference(a[k], b[k], example_input, f"{where}[{k!r}]")) is not None:
                return diff
        return None
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if (diff := _difference(x, y, example_input, f"{where}[{i}]")) is not None:
                return diff
        return None
    if callable(a):
        return None
    if isinstance(a, float) and a != a and b != b:  # NaN == NaN here: the same run twice
        return None
    return None if a == b else f"{where}: {a!r} vs {b!r}"


def _check_dead_channel(criterion, options, model: nn.Module, ctx: Context, fresh, name: str) -> dict[str, int]:
    """Property 4: on a copy of the model with one dead channel per group in scope, each ranks last in its group."""
    dead = copy.deepcopy(model)
    planted = plant_dead_channels(dead, ctx.groups)
    _require(bool(planted), f"{name}: no group in scope has 3 or more channels to plant a dead channel in")
    scores = _checked(_build(criterion, options).run(fresh(dead)), ctx.groups, name)
    _require(isinstance(scores, Scores), f"{name}: returned {type(scores).__name__} on the model with dead channels")
    for gid, c in planted.items():
        if gid not in scores.per_group:
            continue
        s = scores.per_group[gid].double()
        others = torch.cat([s[:c], s[c + 1 :]])
        _require(bool(s[c] <= others.min()) and bool(s[c] < others.max()),
                 f"{name}: the dead channel {c} of group {gid!r} does not rank last (its score {float(s[c]):.4g}, "
                 f"the others {float(others.min()):.4g} to {float(others.max()):.4g})")  # fmt: skip
    _require(any(gid in scores.per_group for gid in planted), f"{name}: scored none of the groups with a dead channel")
    return planted


def _check_plan(model: nn.Module, example_input: Tensor, keep, overrides, name: str) -> None:
    from prune_cli.surgery import prune

    try:
        pruned = prune(model, example_input, keep, overrides or None)
    except Exception as exc:
        raise ConformanceError(f"{name}: its plan does not apply: {exc}") from exc
    with torch.no_grad():
        out, base = _eval_forward(pruned, example_input), _eval_forward(model, example_input)
    _require(
        out.shape == base.shape and bool(torch.isfinite(out).all()),
        f"{name}: the pruned model gives {tuple(out.shape)} outputs (non-finite?), the base {tuple(base.shape)}",
    )


def _check_dynamic(crit: Criterion, result: Dynamic, model: nn.Module, example_input: Tensor, name: str) -> None:
    from prune_cli.metrics import per_input_macs

    dyn = result.model
    base_ptrs = {t.untyped_storage().data_ptr() for t in model.state_dict().values() if t.numel()}
    shared = [k for k, t in dyn.state_dict().items() if t.numel() and t.untyped_storage().data_ptr() in base_ptrs]
    _require(
        not shared,
        f"{name}: its dynamic model shares tensors with the base ({shared[:3]}): training it would change the base",
    )
    with torch.no_grad():
        out, base_out = _eval_forward(dyn, example_input), _eval_forward(model, example_input)
        _require(
            out.shape == base_out.shape and bool(torch.isfinite(out).all()),
            f"{name}: its dynamic model gives {tuple(out.shape)} outputs (non-finite?), the base "
            f"{tuple(base_out.shape)}",
        )
        was_training = dyn.training
        dyn.eval()
        total, overhead = per_input_macs(dyn, example_input)
        macs = float((total - overhead).max())  # the base's work it still does; its own (gates, hashing) aside
        dyn.train(was_training)
        base_macs = float(per_input_macs(model, example_input)[0][0])
    _require(
        macs <= base_macs * (1 + 1e-6),
        f"{name}: its dynamic model executes {macs:.0f} of the base's MACs per input (its own overhead aside), "
        f"more than the base's {base_macs:.0f}",
    )
    config, rebuild = result.config, getattr(type(crit), "rebuild", None)
    if config is not None and callable(rebuild):
        rebuilt = rebuild(copy.deepcopy(model), copy.deepcopy(dict(config)))
        try:
            rebuilt.load_state_dict(dyn.state_dict())
        except RuntimeError as exc:
            raise ConformanceError(
                f"{name}: the model rebuilt from its config does not take its weights: {exc}"
            ) from exc
        with torch.no_grad():
            _require(
                torch.allclose(_eval_forward(rebuilt, example_input), out, atol=1e-5, rtol=1e-4),
                f"{name}: the model rebuilt from its config gives other outputs",
            )
