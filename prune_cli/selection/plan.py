"""Scores -> keep-plan under a cost budget. The same code for every score-based criterion, which is what makes
comparing criteria fair. (A measured-latency budget: latency.py, which ends in `finish` here too.)

Modes: `uniform` (one removal ratio for every group in scope), `global` (one threshold over scores normalised by
each group's maximum), or per-group ratios from an `Allocation` (scaled by one factor unless `exact`). The one free
parameter is bisected on the fast cost model until the MACs (or params) reduction reaches the target; the
achieved reduction is reported next to the requested one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from prune_cli.api import Allocation, ChannelGroup, Scores, Target
from prune_cli.errors import BadValue, TargetUnreachable
from prune_cli.selection import fast_widths as FW
from prune_cli.surgery.cost import CostModel


@dataclass
class Selection:
    """A keep-plan and what it costs."""

    keep: dict[str, Tensor]
    metric: str
    requested: float
    achieved: float
    base_macs: int
    macs: int
    base_params: int
    params: int
    ratios: dict[str, float] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # a latency target's measurements (see latency.py)

    def as_dict(self) -> dict:
        return {
            "metric": self.metric, "requested": self.requested, "achieved": self.achieved,
            "base_macs": self.base_macs, "macs": self.macs, "base_params": self.base_params, "params": self.params,
            "ratios": self.ratios, **self.extra,
        }  # fmt: skip


def groups_in_scope(groups: list[ChannelGroup], scope: str = "internal") -> list[ChannelGroup]:
    """Prunable groups; with scope `internal` (default) never a group that feeds a residual sum."""
    if scope not in ("internal", "all"):
        raise BadValue(f"scope must be 'internal' or 'all', got {scope!r}")
    return [g for g in groups if g.prunable and (scope == "all" or not g.residual)]


def kept_count(size: int, ratio: float, round_to: int = 1, max_ratio: float = 0.9) -> int:
    """Channels kept when removing `ratio` of `size`: at least 1, at least (1 - max_ratio) * size, a multiple of
    `round_to` where the group is large enough."""
    ratio = min(max(ratio, 0.0), max_ratio)
    k = max(1, math.ceil(size * (1 - ratio) - 1e-9))
    if round_to > 1 and size >= round_to:
        k = min(size, max(round_to, int(round(k / round_to)) * round_to))
    return k


def select(
    model: nn.Module,
    example_input: Tensor,
    groups: list[ChannelGroup],
    scores: Scores,
    target: Target,
    *,
    mode: str = "uniform",
    ratios: Allocation | None = None,
    round_to: int = 1,
    max_ratio: float = 0.9,
    cost: CostModel | None = None,
    latency_batch: int = 0,
) -> Selection:
    """Keep the highest-scoring channels of each group in `groups`, as many as the target allows.

    latency_batch > 0: round each group's count down to a width that runs faster than every wider one at that batch
    size on this machine (`fast_widths`); the bisection then prunes the other groups less, to meet the target, and
    channels that the target does not need are given back.

    Raises TargetUnreachable (with the best achievable reduction) when even the most pruning allowed falls short.
    """
    cost = cost or CostModel(model, example_input)
    groups = [g for g in groups if g.id in scores.per_group]
    if not groups:
        raise TargetUnreachable("no prunable channel group in scope (try --scope all)")
    base = cost.base(target.metric)

    if ratios is not None:
        rel = {g.id: float(ratios.ratios.get(g.id, 0.0)) for g in groups}
        if ratios.exact:
            counts = {g.id: kept_count(g.size, rel[g.id], round_to, max_ratio) for g in groups}
            if latency_batch:
                timer = FW.LayerTimer(model, example_input, latency_batch)
                counts = FW.snap(counts, _fast_widths(cost, timer, groups, counts, round_to, max_ratio))
            return finish(cost, groups, scores, counts, target)
        top = max(rel.values()) or 1.0

        def counts_at(t: float) -> dict[str, int]:
            return {g.id: kept_count(g.size, t * rel[g.id] / top, round_to, max_ratio) for g in groups}

        hi = max_ratio * max(top / max(r, 1e-9) for r in rel.values() if r > 0) if any(rel.values()) else max_ratio
    elif mode == "uniform":

        def counts_at(t: float) -> dict[str, int]:
            return {g.id: kept_count(g.size, t, round_to, max_ratio) for g in groups}

        hi = max_ratio
    elif mode == "global":
        normed = {g.id: _normalise(scores.per_group[g.id]) for g in groups}

        def counts_at(t: float) -> dict[str, int]:
            # t in [0, 1]: remove channels whose normalised score is below t
            out = {}
            for g in groups:
                removed = int((normed[g.id] < t).sum())
                out[g.id] = kept_count(g.size, removed / g.size, round_to, max_ratio)
            return out

        hi = 1.0 + 1e-6
    else:
        raise BadValue(f"selection mode must be 'uniform' or 'global', got {mode!r}")

    def reduction(counts: dict[str, int]) -> float:
        return 1 - cost.metric(counts, target.metric) / base

    counts = bisect(lambda t: reduction(counts_at(t)), target.reduction, hi, counts_at)
    if latency_batch:
        timer = FW.LayerTimer(model, example_input, latency_batch)
        # A group's fast widths depend on its neighbours' widths (a conv's time on both), so the second round times
        # them against the first round's plan.
        for _ in range(2):
            fast = _fast_widths(cost, timer, groups, counts, round_to, max_ratio)

            def snapped_at(t: float, fast=fast) -> dict[str, int]:
                return FW.snap(counts_at(t), fast)

            counts = bisect(lambda t: reduction(snapped_at(t)), target.reduction, hi, snapped_at)
            counts = FW.give_back(cost, timer, groups, counts, fast, lambda c: reduction(c) + 1e-9 >= target.reduction)
    return finish(cost, groups, scores, counts, target)


def _fast_widths(
    cost: CostModel, timer: FW.LayerTimer, groups: list[ChannelGroup], counts: Mapping[str, int], round_to: int,
    max_ratio: float,
) -> dict[str, list[int]]:  # fmt: skip
    """The fast widths of each group (see `fast_widths`), timed with the other groups at `counts`, from the full
    width down to half of `counts` (the plan moves little from there; below, a group rounds up to its narrowest)."""
    lowest = {g.id: max(kept_count(g.size, max_ratio, round_to, max_ratio), counts[g.id] // 2) for g in groups}
    return FW.fast_widths(
        cost, timer, groups, counts, lowest, step=lambda size: round_to if size >= round_to > 1 else max(1, size // 32)
    )


def check_reachable(
    cost: CostModel, groups: list[ChannelGroup], target: Target, round_to: int = 1, max_ratio: float = 0.9
) -> float:
    """The largest reduction the constraints allow; raises TargetUnreachable (before any scoring) if below target."""
    most = {g.id: kept_count(g.size, max_ratio, round_to, max_ratio) for g in groups}
    best = 1 - cost.metric(most, target.metric) / cost.base(target.metric)
    if best + 1e-9 < target.reduction:
        raise TargetUnreachable(
            f"cannot remove {target.reduction:.1%} of the {target.metric}: the most the constraints allow is "
            f"{best:.1%} (raise --max-ratio, use --scope all, or lower the target)"
        )
    return best


def bisect(reduction_at: Callable[[float], float], want: float, hi: float, counts_at) -> dict[str, int]:
    """`counts_at(t)` at the smallest t in [0, hi] whose reduction reaches `want` (reduction is monotone in t).

    Raises TargetUnreachable when even `hi` falls short. Criteria that choose widths themselves use it too.
    """
    best = reduction_at(hi)
    if best + 1e-9 < want:
        raise TargetUnreachable(
            f"cannot remove {want:.1%} of the cost: the most the constraints allow is {best:.1%} "
            f"(raise --max-ratio, use --scope all, or lower the target)"
        )
    lo = 0.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if reduction_at(mid) >= want:
            hi = mid
        else:
            lo = mid
    return counts_at(hi)


def _normalise(s: Tensor) -> Tensor:
    s = s.double()
    lo, hi = s.min(), s.max()
    return (s - lo) / (hi - lo) if hi > lo else torch.ones_like(s)


def finish(
    cost: CostModel, groups: list[ChannelGroup], scores: Scores, counts: Mapping[str, int], target: Target
) -> Selection:
    """The plan keeping the `counts[g]` highest-scoring channels of each group, with its cost report."""
    keep = {}
    for g in groups:
        k = counts[g.id]
        if k < g.size:
            # stable: ties keep the lower channel index, so a plan is deterministic
            order = torch.sort(-scores.per_group[g.id].double(), stable=True).indices
            keep[g.id] = order[:k].sort().values
    return _report(cost, keep, target, {g.id: 1 - counts[g.id] / g.size for g in groups})


def _report(cost: CostModel, keep: Mapping[str, Tensor], target: Target, ratios: dict[str, float]) -> Selection:
    kept = {gid: len(idx) for gid, idx in keep.items()}
    macs, params = cost.cost(kept)
    base = cost.base(target.metric)
    achieved = 1 - (macs if target.metric == "macs" else params) / base
    return Selection(dict(keep), target.metric, target.reduction, achieved, cost.base_macs, macs,
                     cost.base_params, params, ratios)  # fmt: skip


def plan_report(model: nn.Module, example_input: Tensor, keep: Mapping[str, Tensor], target: Target) -> Selection:
    """The cost report of a plan a method chose itself (clustering, LASSO)."""
    cost = CostModel(model, example_input)
    ratios = {gid: 1 - len(idx) / cost.sizes[gid] for gid, idx in keep.items()}
    return _report(cost, keep, target, ratios)
