"""`prune_cli.prune`: prune a model in memory, for notebooks and scripts (no files, no training, no timing).

    import prune_cli, torchvision
    model = torchvision.models.resnet18(num_classes=10)
    small, report = prune_cli.prune(model, torch.randn(1, 3, 32, 32), "l1", target_macs=0.5)
    report.macs_after / report.macs_before          # about 0.5
    report.widths["layer1.0.conv1"]                 # channels kept in that group

The same steps as `prune-cli prune` (`pruning.score`, then `pruning.remove`: the criterion's checked result, the
shared selection, surgery); what a run adds around them (data files, BatchNorm re-estimation, fine-tuning,
latency, records) is left to the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from prune_cli import surgery
from prune_cli.api import CalibData, Dynamic, Target
from prune_cli.errors import BadValue
from prune_cli.metrics import count_macs, count_params, per_input_macs
from prune_cli.run import pruning


@dataclass(frozen=True)
class PruneReport:
    """What `prune` did. MACs are per image (a dynamic model's: the mean executed over the calibration images, or
    the example input); `achieved` is the fraction of `metric` removed; `widths` and `sizes` are the channels each
    channel group in scope keeps and had (a dynamic model keeps them all and skips some per input)."""

    criterion: str
    options: dict[str, Any]
    result: str  # Scores, Allocation, Plan or Dynamic
    metric: str
    requested: float
    achieved: float
    macs_before: int
    macs_after: float
    params_before: int
    params_after: int
    widths: dict[str, int]
    sizes: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def prune(
    model: nn.Module,
    example_input: Tensor,
    criterion: str = "l1",
    target_macs: float | None = 0.5,
    calib: CalibData | tuple[Tensor, Tensor] | Tensor | None = None,
    *,
    target_params: float | None = None,
    scope: str = "internal",
    selection: str | Mapping[str, Any] = "uniform",
    seed: int = 0,
    log: Callable[[str], None] = lambda message: None,
    **options: Any,
) -> tuple[nn.Module, PruneReport]:
    """A physically smaller copy of `model` (which is left untouched) and a report.

    Args:
        model: a CNN whose output is (N, classes); scored in eval mode (its training flag is restored after).
        example_input: one image (1, C, H, W), normalised as the model expects, on the model's device.
        criterion: a registered name (`prune-cli list criteria`); `options` are its options (`l1`: mode="greedy").
        target_macs: the fraction of the MACs per image to remove.
        calib: the images criteria that need data score on, x (N, C, H, W), with their labels y (N,) int64 as a
            pair or a CalibData where the criterion needs labels.
        target_params: if given, replaces target_macs: the fraction of the parameters to remove.
        scope: "internal" (default) or "all" (the groups that feed residual sums too).
        selection: the shared selection's mode ("uniform" or "global"), or a mapping of its settings as on the
            command line, {"mode": "global", "round_to": 8, "max_ratio": 0.8} (kept apart from the criterion's
            options, some of which share those names).
        seed: the seed of the criterion's random choices.
        log: called with progress messages.

    A criterion that trains while fine-tuning (manidp) needs `prune-cli prune`. Errors are PruneCliError (one
    line, as the CLI prints them).
    """
    if target_macs is None and target_params is None:
        raise BadValue("give a target: target_macs or target_params (the fraction to remove)")
    target = Target("macs", target_macs) if target_params is None else Target("params", target_params)
    if example_input.dim() != 4 or example_input.shape[0] != 1:
        raise BadValue(f"the example input must be one image (1, C, H, W), got shape {tuple(example_input.shape)}")
    settings = {"mode": selection} if isinstance(selection, str) else dict(selection)
    if unknown := set(settings) - {"mode", "round_to", "max_ratio"}:
        raise BadValue(f"unknown selection settings {sorted(unknown)}: mode, round_to and max_ratio are")
    job = pruning.PruneJob(criterion=criterion, options=options, target=target, scope=scope, seed=seed, **settings)
    crit = pruning.build_criterion(criterion, options)
    if "train" in crit.needs:
        raise BadValue(f"{criterion} learns while fine-tuning, which prune() does not do: use `prune-cli prune` "
                       "with --finetune-epochs")  # fmt: skip
    calib_data = _calib(calib, crit.needs, criterion)
    was_training = model.training
    try:
        with torch.no_grad():
            num_classes = int(model.eval()(example_input).shape[1])
        groups = surgery.channel_groups(model, example_input)
        ctx = pruning.context(model, groups, example_input, num_classes, calib_data, job, example_input.device, log)
        result = pruning.score(crit, ctx, job)
        if isinstance(result, Dynamic):
            pruned = result.model.eval()
            macs_after = float(per_input_macs(pruned, calib_data.x if calib_data else example_input)[0].mean())
            widths = {g.id: g.size for g in ctx.groups}
        else:
            pruned, keep, _ = pruning.remove(result, ctx, groups, job)
            pruned.eval()
            macs_after = count_macs(pruned, example_input)
            widths = {g.id: len(keep[g.id]) if g.id in keep else g.size for g in ctx.groups}
        macs_before = count_macs(model, example_input)
        params_before, params_after = count_params(model), count_params(pruned)
    finally:
        model.train(was_training)
    before, after = (macs_before, macs_after) if target.metric == "macs" else (params_before, params_after)
    return pruned, PruneReport(
        criterion=criterion, options=asdict(crit.options), result=type(result).__name__, metric=target.metric,
        requested=target.reduction, achieved=1 - after / before, macs_before=macs_before, macs_after=macs_after,
        params_before=params_before, params_after=params_after, widths=widths, sizes={g.id: g.size for g in ctx.groups},
    )  # fmt: skip


def _calib(calib, needs: frozenset[str], name: str) -> CalibData | None:
    """The calibration data a criterion needs, as a CalibData (None if it needs none)."""
    if not needs & {"data", "labels", "grad", "train"}:
        return None
    if calib is None:
        raise BadValue(f"{name} scores on data: pass calib=(x, y), images (N, C, H, W) and their labels (N,)")
    if isinstance(calib, CalibData):
        return calib
    if isinstance(calib, tuple):
        return CalibData(*calib)
    if needs & {"labels", "grad"}:
        raise BadValue(f"{name} needs labelled images: pass calib=(x, y)")
    return CalibData(calib, torch.zeros(len(calib), dtype=torch.int64, device=calib.device))  # labels unused
