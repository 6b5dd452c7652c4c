"""The only module a criterion imports: channel groups, the read-only context, result types, checks.

A criterion is a class registered with `@register_criterion()`:

    @register_criterion()
    class L1(Criterion):
        name = "l1"
        paper = "1608.08710"
        needs = frozenset()                      # subset of {"data", "labels", "grad", "train"}

        @dataclass(frozen=True)
        class Options:                           # defaults = the decisions in METHODS.md
            mode: str = "independent"

        def run(self, ctx: Context) -> Result: ...

Results are a closed union: `Scores` (higher = keep; the shared selection makes the plan), `Allocation`
(per-group ratios), `Plan` (kept indices chosen by the method, with optional weight overrides keyed by the
pruned model's parameter names) and `Dynamic` (an input-dependent model, optional training hooks). A criterion that
returns `Dynamic` subclasses `DynamicCriterion` and says how to rebuild its model from a model file (`rebuild`).

The submodules are the API too, for what several criteria share: `api.dynamic` (the per-input cost protocol of
dynamic modules), `api.graph` (the fx trace and graph split, channel groups, physical removal, the cost model,
which BatchNorm reads a layer's output), `api.selection` (the shared selection's kept counts and bisection). A
criterion imports these and `prune_cli.errors`, nothing else of the project (tests/test_criteria_imports.py).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from prune_cli.errors import BadValue, PruneCliError
from prune_cli.registry import Registry

NEEDS = frozenset({"data", "labels", "grad", "train"})
MemberKind = Literal["conv_out", "conv_in", "depthwise", "bn", "linear_out", "linear_in"]


# --------------------------------------------------------------------------------------------------- groups
@dataclass(frozen=True)
class Member:
    """One tensor dimension touched by removing channels of a group.

    `module` is the dotted module name. `kind` says which dimension: `conv_out` (dim 0 of the weight, and
    the bias), `conv_in` (dim 1), `depthwise` (a grouped conv whose in and out channels are the group),
    `bn` (all four buffers), `linear_out`, `linear_in` (dim 1). `offset` places the group inside a larger
    dimension (channel concatenation); `expand` is the number of features per channel after a flatten
    (channel c owns features [c*expand, (c+1)*expand) of a Linear's input).
    """

    module: str
    kind: MemberKind
    offset: int = 0
    expand: int = 1


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be removed together. `id` is stable and readable (the first producer's name).

    `residual` is true when the channels feed a residual sum (every branch of the sum is in the group).
    `prunable` is false for the image's input channels and the classifier's outputs.
    """

    id: str
    size: int
    members: tuple[Member, ...]
    prunable: bool = True
    residual: bool = False

    @property
    def producers(self) -> tuple[Member, ...]:
        """Members whose output channels are the group (conv/linear out-channels, depthwise convs)."""
        return tuple(m for m in self.members if m.kind in ("conv_out", "linear_out", "depthwise"))

    @property
    def consumers(self) -> tuple[Member, ...]:
        """Members that read the group as input (conv/linear in-channels, depthwise convs)."""
        return tuple(m for m in self.members if m.kind in ("conv_in", "linear_in", "depthwise"))

    @property
    def norms(self) -> tuple[Member, ...]:
        return tuple(m for m in self.members if m.kind == "bn")


# ------------------------------------------------------------------------------------------------- targets
@dataclass(frozen=True)
class Target:
    """A cost target: remove `reduction` (0..1) of the model's `metric` ("macs" or "params")."""

    metric: Literal["macs", "params"] = "macs"
    reduction: float = 0.5

    def __post_init__(self):
        if self.metric not in ("macs", "params"):
            raise BadValue(f"target metric must be 'macs' or 'params', not {self.metric!r}")
        if not (0.0 <= self.reduction < 1.0) or math.isnan(self.reduction):
            raise BadValue(f"target {self.metric} reduction must be in [0, 1), got {self.reduction}")

    @property
    def keep(self) -> float:
        return 1.0 - self.reduction


# ------------------------------------------------------------------------------------------------- context
@dataclass(frozen=True)
class CalibData:
    """Held-out training images for scoring: x (N, C, H, W) float, normalised; y (N,) int64 labels."""

    x: Tensor
    y: Tensor

    def batches(self, batch_size: int = 256, limit: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        n = len(self.x) if limit is None else min(limit, len(self.x))
        for i in range(0, n, batch_size):
            j = min(i + batch_size, n)
            yield self.x[i:j], self.y[i:j]

    def __len__(self) -> int:
        return len(self.x)


@dataclass(frozen=True)
class Context:
    """What a criterion may read. Treat it and everything in it as read-only.

    `model` is in eval mode on `device`; `groups` are the prunable groups in scope (the selection scope
    already applied); `all_groups` includes the others; `calib` is None when the criterion needs no data;
    `example_input` is (1, C, H, W).
    """

    model: nn.Module
    groups: tuple[ChannelGroup, ...]
    all_groups: tuple[ChannelGroup, ...]
    example_input: Tensor
    num_classes: int
    target: Target
    calib: CalibData | None = None
    device: torch.device = torch.device("cpu")
    seed: int = 0
    log: Callable[[str], None] = lambda message: None
    progress: Callable[[str, int], Callable[[int], None]] = lambda label, total: lambda advance=1: None

    def generator(self, salt: int = 0) -> torch.Generator:
        """A fresh CPU generator seeded by the run's seed (plus `salt` for independent streams)."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + salt)

    def group(self, group_id: str) -> ChannelGroup:
        for g in self.all_groups:
            if g.id == group_id:
                return g
        raise KeyError(group_id)

    def require_calib(self) -> CalibData:
        if self.calib is None:
            raise PruneCliError("this criterion needs calibration data, but none was given")
        return self.calib

    def cost_model(self):
        """The cost model (`api.graph.CostModel`) of the context's model and example input: MACs and params of any
        kept count per group, without building the smaller model. Built once per context."""
        cached = self.__dict__.get("_cost_model")
        if cached is None:
            from prune_cli.surgery.cost import CostModel  # late: surgery imports this module

            cached = CostModel(self.model, self.example_input)
            object.__setattr__(self, "_cost_model", cached)
        return cached

    def prune(
        self,
        keep: Mapping[str, Tensor],
        overrides: Mapping[str, Tensor] | None = None,
        *,
        model: nn.Module | None = None,
    ) -> nn.Module:
        """A physically smaller copy of the context's model keeping, per group id in `keep`, the given channel
        indices (sorted, int64); groups not named keep all. `overrides` replaces parameters or buffers of the pruned
        model by name. `model`: prune this model instead, a copy of the context's model with other weights or with
        groups already pruned (its channel groups are found again). The model pruned is left untouched."""
        from prune_cli.surgery.apply import prune  # late: surgery imports this module

        if model is None:
            return prune(self.model, self.example_input, keep, overrides, groups=list(self.all_groups))
        return prune(model, self.example_input, keep, overrides)

    @torch.no_grad()
    def iter_module_outputs(
        self, names: Sequence[str], batch_size: int = 256, limit: int | None = None, inputs: bool = False
    ) -> Iterator[dict[str, Tensor]]:
        """Per batch of calibration images, the outputs (or inputs) of the named modules: {name: (n, ...)} on the
        device, detached. For statistics accumulated over the batches, whose memory does not grow with N."""
        calib = self.require_calib()
        modules = dict(self.model.named_modules())
        captured: dict[str, Tensor] = {}

        def hook(name: str):
            def fn(_module, args, output):
                captured[name] = (args[0] if inputs else output).detach()

            return fn

        handles = [modules[n].register_forward_hook(hook(n)) for n in names]
        try:
            for x, _ in calib.batches(batch_size, limit):
                captured.clear()
                self.model(x.to(self.device))
                yield {n: captured[n] for n in names}
        finally:
            for h in handles:
                h.remove()

    def module_outputs(
        self, names: Sequence[str], batch_size: int = 256, limit: int | None = None, inputs: bool = False
    ) -> dict[str, Tensor]:
        """Outputs (or inputs) of the named modules on the calibration images, concatenated over batches.

        Returns {name: (N, ...)} on the CPU. Memory grows with N; pass `limit` for large layers, or accumulate
        statistics batch by batch with `iter_module_outputs`.
        """
        captured: dict[str, list[Tensor]] = {n: [] for n in names}
        for batch in self.iter_module_outputs(names, batch_size, limit, inputs):
            for n, t in batch.items():
                captured[n].append(t.cpu())
        return {n: torch.cat(v) for n, v in captured.items()}


# ------------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Scores:
    """Per group a finite 1-D tensor of length `group.size`; higher = keep."""

    per_group: Mapping[str, Tensor]


@dataclass(frozen=True)
class Allocation:
    """Per group the fraction of channels to remove (0..1); channels inside ranked by criterion `rank`.

    `ratios` are relative: the selection may rescale them to meet the target unless `exact` is true.
    """

    ratios: Mapping[str, float]
    rank: str = "l1"
    exact: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    """Kept channel indices per group (sorted, int64), chosen by the method; groups not named keep all.

    `overrides` maps parameter/buffer names of the PRUNED model to replacement tensors.
    """

    keep: Mapping[str, Tensor]
    overrides: Mapping[str, Tensor] = field(default_factory=dict)


class TrainHooks:
    """Optional additions to the normal training loop (override what you need)."""

    def extra_loss(
        self, model: nn.Module, x: Tensor, y: Tensor, logits: Tensor, per_sample_ce: Tensor
    ) -> Tensor | None:
        """An extra loss term added to the mean cross entropy, or None."""
        return None

    def on_train_start(self, model: nn.Module, steps_per_epoch: int, epochs: int) -> None:
        """Called once before the first step, with the number of steps per epoch and of epochs."""

    def on_epoch_end(self, model: nn.Module, epoch: int, epochs: int, stats: Mapping[str, float]) -> None:
        """Called after each epoch with that epoch's training stats (loss, acc)."""

    def no_weight_decay(self, name: str) -> bool:
        """True for parameters that must not be decayed (e.g. gates)."""
        return False

    def lr_scale(self, name: str) -> float:
        """Learning-rate multiplier of a parameter (e.g. gates learnt from scratch while the rest fine-tunes)."""
        return 1.0


def recalibrate_batchnorm(model: nn.Module, images: Tensor, *, batch_size: int = 256) -> int:
    """Re-estimate every BatchNorm's running statistics of `model` on all `images` (N, C, H, W), forward passes
    only; returns the number of BatchNorms. The engine's one implementation (`prune_cli.engine`), offered here
    because a criterion imports only the API."""
    from prune_cli.engine import recalibrate_batchnorm as shared  # late: the engine imports this module

    return shared(model, images, images=len(images), batch_size=batch_size)


@dataclass(frozen=True)
class Dynamic:
    """An input-dependent model. Its dynamic modules record the MACs they execute per sample.

    `config`: what the criterion's `rebuild` needs to turn a freshly built base model back into this model before
    its weights are loaded (JSON-serialisable; the model file keeps it, with the criterion's name under
    "criterion"). `extra`: anything else the run reports or calls (e.g. a `finalize` step after training).
    """

    model: nn.Module
    hooks: TrainHooks | None = None
    config: Mapping[str, Any] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


Result = Scores | Allocation | Plan | Dynamic


# ------------------------------------------------------------------------------------------------ criteria
class Criterion:
    """Base class of every criterion. Subclasses set the class attributes and implement `run`."""

    name: ClassVar[str]
    paper: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset()
    summary: ClassVar[str] = ""
    # True for criteria that return Dynamic (their cost target is per input, checked by the method itself)
    dynamic: ClassVar[bool] = False

    @dataclass(frozen=True)
    class Options:
        pass

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.Options()

    def run(self, ctx: Context) -> Result:
        raise NotImplementedError


class DynamicCriterion(Criterion, abc.ABC):
    """Base class of criteria that return `Dynamic`: an input-dependent model whose cost target is per input, met
    by the method itself. A model file of such a model names the criterion, and loading it calls the criterion's
    `rebuild` through the registry."""

    dynamic: ClassVar[bool] = True

    @classmethod
    @abc.abstractmethod
    def rebuild(cls, model: nn.Module, config: Mapping[str, Any]) -> nn.Module:
        """Turn `model`, freshly built from its factory (no weights of the run), into the dynamic model that
        `Dynamic.config` describes, so that the saved state dict loads into it strictly. May modify `model`."""


CRITERIA: Registry[type[Criterion]] = Registry("criterion", entry_point_group="prune_cli.criteria")


def register_criterion(name: str | None = None):
    """Class decorator registering a criterion under `name` (default: its `name` attribute)."""

    def decorate(cls: type[Criterion]) -> type[Criterion]:
        if not cls.needs <= NEEDS:
            raise TypeError(f"{cls.__name__}.needs has unknown entries {set(cls.needs - NEEDS)}")
        if cls.dynamic and not issubclass(cls, DynamicCriterion):
            raise TypeError(f"{cls.__name__} is dynamic: subclass DynamicCriterion (it says how to rebuild its model)")
        if getattr(cls, "__abstractmethods__", None):
            raise TypeError(f"{cls.__name__} does not implement {', '.join(sorted(cls.__abstractmethods__))}")
        return CRITERIA.register(name or cls.name)(cls)

    return decorate


# -------------------------------------------------------------------------------------------------- checks
def check_result(result: Result, groups: Sequence[ChannelGroup]) -> Result:
    """Validate a criterion's result against the groups in scope; raise PruneCliError on any fault."""
    by_id = {g.id: g for g in groups}

    def known(gid: str) -> ChannelGroup:
        if gid not in by_id:
            raise PruneCliError(f"criterion result names group {gid!r}, which is not a prunable group in scope")
        return by_id[gid]

    match result:
        case Scores(per_group=per_group):
            for gid, s in per_group.items():
                g = known(gid)
                if not isinstance(s, Tensor) or s.dim() != 1 or s.numel() != g.size:
                    raise PruneCliError(f"scores of group {gid!r} must be a 1-D tensor of {g.size} values")
                if not torch.isfinite(s).all():
                    raise PruneCliError(f"scores of group {gid!r} contain NaN or infinite values")
        case Allocation(ratios=ratios):
            for gid, r in ratios.items():
                known(gid)
                if not (0.0 <= float(r) < 1.0):
                    raise PruneCliError(f"allocation ratio of group {gid!r} must be in [0, 1), got {r}")
        case Plan(keep=keep):
            for gid, idx in keep.items():
                g = known(gid)
                if not isinstance(idx, Tensor) or idx.dim() != 1 or idx.numel() == 0:
                    raise PruneCliError(f"plan for group {gid!r} must keep at least one channel (1-D indices)")
                if idx.dtype not in (torch.int64, torch.int32):
                    raise PruneCliError(f"plan for group {gid!r} must hold integer indices")
                if int(idx.min()) < 0 or int(idx.max()) >= g.size:
                    raise PruneCliError(f"plan for group {gid!r} has indices outside [0, {g.size})")
                if idx.unique().numel() != idx.numel() or not bool((idx[1:] > idx[:-1]).all()):
                    raise PruneCliError(f"plan for group {gid!r} must hold sorted, unique indices")
        case Dynamic(model=model, config=config):
            if not isinstance(model, nn.Module):
                raise PruneCliError("a Dynamic result must hold an nn.Module")
            if config is not None and not isinstance(config, Mapping):
                raise PruneCliError("a Dynamic result's config must be a mapping (what `rebuild` reads)")
        case _:
            raise PruneCliError(f"criterion returned {type(result).__name__}, not Scores/Allocation/Plan/Dynamic")
    return result


def get_criterion(name: str) -> type[Criterion]:
    """The criterion class registered as `name` (built-ins are imported on first use)."""
    import criteria  # noqa: F401  (registers the built-in criteria)

    return CRITERIA.get(name)


def list_criteria() -> list[str]:
    import criteria  # noqa: F401

    return CRITERIA.names()
