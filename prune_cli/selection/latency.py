"""Latency as the target: remove a fraction of the base model's measured latency on this device, at one batch size.

How (the method notes say why):
1. A table of each conv layer's time at candidate widths, on this device, thread count and batch size
   (`LatencyTable`, built on `fast_widths.LayerTimer`), cached on disk per architecture so that a later run times
   nothing it has timed before.
2. Each timed layer's time is charged to one channel group: the group of its output channels if that group is
   pruned, else the group of its input channels (a ResNet block's second conv, whose outputs feed the residual sum);
   the other group's width is held at its full width (exact for ResNets pruned inside their blocks; an upper bound
   on a chain's layers). A group's cost at width w is then the summed time of its layers, its value the log of the
   share of its score mass that the top w channels hold, weighted by its full-width time (`values_of`), and the plan
   with the most value under a time budget is a multiple-choice knapsack (`knapsack`), as in HALP (Shen et al.,
   NeurIPS 2022, arXiv 2110.10811), solved exactly by dynamic programming over the budget cut into small steps.
   Per-group ratios (an `Allocation`) are scaled by one factor to the budget instead.
3. The table predicts the convolutions only; the rest of a forward pass (BatchNorm, activations, the framework's
   per-layer overhead) is measured, not modelled: the plan is built, timed against the base in alternating turns,
   and the budget corrected (regula falsi) until the measured reduction is within `tolerance` of the requested one,
   a few rounds at most. What was reached is reported next to what was requested.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from prune_cli.api import ChannelGroup, Scores
from prune_cli.errors import BadValue, TargetUnreachable
from prune_cli.selection import fast_widths as FW
from prune_cli.surgery.cost import CostModel

CACHE_ENV = "PRUNE_CLI_CACHE_DIR"
RUNTIMES = ("torch", "onnxruntime")


def cache_dir() -> Path:
    """Where latency tables are cached: $PRUNE_CLI_CACHE_DIR, else $XDG_CACHE_HOME/prune-cli, else
    ~/.cache/prune-cli."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "prune-cli"


def check_latency_target(reduction: float, batch: int, tolerance: float = 0.02) -> None:
    """Refuse a latency fraction outside (0, 1), a batch size below 1 or a tolerance outside (0, 0.5)."""
    if not 0 < reduction < 1 or math.isnan(reduction):
        raise BadValue(f"--target-latency must be in (0, 1) (the fraction of the measured latency to remove), "
                       f"got {reduction}")  # fmt: skip
    if batch < 1:
        raise BadValue(f"--latency-batch must be >= 1, got {batch}")
    if not 0 < tolerance < 0.5:
        raise BadValue(f"latency tolerance must be in (0, 0.5), got {tolerance}")


class LatencyTable:
    """Forward time (ms) of each conv layer of one architecture at any (in, out) widths, on this device, thread count
    and batch size; read from and written to CACHE/latency/KEY.json, `cache` being `cache_dir()` in a run and a
    test's own folder in tests (None: no file).

    `timed` / `reused`: the distinct shapes this table timed / found in the file; `timing_s`: seconds spent timing.
    """

    def __init__(
        self, model: nn.Module, example_input: Tensor, batch: int, *, cache: Path | None = None,
        seconds: float = 0.005,
    ):  # fmt: skip
        import time

        t0 = time.perf_counter()
        self.timer = FW.LayerTimer(model, example_input, batch, seconds=seconds)
        self.batch = batch
        self.key, self.description = _table_key(self.timer, batch)
        self.path = None if cache is None else cache / "latency" / f"{self.key}.json"
        self._ms: dict[str, float] = self._load()
        self._loaded = set(self._ms)
        self._used: set[str] = set()
        self.timing_s = time.perf_counter() - t0

    @property
    def timed(self) -> int:
        return len(self._used - self._loaded)

    @property
    def reused(self) -> int:
        return len(self._used & self._loaded)

    def measure(self, shapes: Sequence[tuple[str, int, int]]) -> None:
        """Time the (layer, in, out) shapes the table does not hold yet (in `LayerTimer.measure`'s two rounds)."""
        import time

        shapes = [s for s in dict.fromkeys(shapes) if s[0] in self.timer.convs]
        self._used.update(_k(*s) for s in shapes)
        todo = [s for s in shapes if _k(*s) not in self._ms]
        if todo:
            t0 = time.perf_counter()
            self.timer.measure(todo)
            for s in todo:
                self._ms[_k(*s)] = self.timer.ms(*s)
            self.timing_s += time.perf_counter() - t0

    def ms(self, name: str, in_width: int, out_width: int) -> float:
        """Time of layer `name` at these widths (0.0 for a layer that is not timed: linear, grouped)."""
        if name not in self.timer.convs:
            return 0.0
        key = _k(name, in_width, out_width)
        if key not in self._ms:
            self.measure([(name, in_width, out_width)])
        self._used.add(key)
        return self._ms[key]

    def _load(self) -> dict[str, float]:
        """The file's times, if it is a table of this key; a missing, foreign or malformed file reads as empty (it
        is data: only finite positive numbers under well-formed keys are taken)."""
        if self.path is None or not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("key") != self.key or not isinstance(data.get("ms"), dict):
            return {}
        return {
            k: float(v) for k, v in data["ms"].items()
            if isinstance(k, str) and k.count("|") == 2 and isinstance(v, (int, float)) and math.isfinite(v) and v > 0
        }  # fmt: skip

    def save(self) -> None:
        """Write the table (merged with what another process may have written since), atomically. A cache that
        cannot be written is skipped: it only saves time."""
        if self.path is None:
            return
        from prune_cli.store.files import CannotWrite, atomic_write

        merged = {**self._load(), **self._ms}
        text = json.dumps({"key": self.key, "description": self.description, "ms": merged}, sort_keys=True)
        try:
            with atomic_write(self.path) as tmp:
                tmp.write_text(text)
        except CannotWrite:
            pass


def _k(name: str, in_width: int, out_width: int) -> str:
    return f"{name}|{int(in_width)}|{int(out_width)}"


def _table_key(timer: FW.LayerTimer, batch: int) -> tuple[str, dict]:
    """(hash, description) of what a layer's time depends on: the conv layers' shapes, device, threads, batch, torch
    and the CPU."""
    from prune_cli.run.environment import machine

    layers = [
        [name, m.in_channels, m.out_channels, list(m.kernel_size), list(m.stride), list(m.padding), list(m.dilation),
         m.groups, m.bias is not None, list(hw)]
        for name, (m, hw) in timer.convs.items()
    ]  # fmt: skip
    where = machine()
    description = {
        "layers": layers, "device": str(timer.device), "threads": torch.get_num_threads(), "batch": batch,
        "torch": where["torch"], "cpu": where["cpu"], "cuda": where["cuda"],
    }  # fmt: skip
    text = json.dumps(description, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20], description


# ----------------------------------------------------------------------------------------------------- knapsack
def knapsack(values: Sequence[Sequence[float]], costs: Sequence[Sequence[float]], budget: float,
             resolution: int = 4000) -> list[int]:  # fmt: skip
    """Multiple-choice knapsack: one option per item, the most summed value with summed cost <= `budget`.

    values[i][j], costs[i][j]: option j of item i. Each item's costs are taken above its cheapest option, and those
    extra costs are rounded up to steps of (budget left) / `resolution`, so the answer never exceeds the budget; it
    is exact when the costs are multiples of that step. Ties go to the option listed first. Returns the chosen
    option of each item. Raises ValueError when even the cheapest options exceed the budget.
    """
    floors = [min(c) for c in costs]
    left = budget - sum(floors)
    if left < -1e-9 * max(1.0, abs(budget)):
        raise ValueError(f"the cheapest options cost {sum(floors):.6g}, over the budget {budget:.6g}")
    left = max(left, 0.0)
    step = left / resolution if left > 0 else 1.0
    size = resolution + 1 if left > 0 else 1
    dp = np.full(size, -np.inf)
    dp[0] = 0.0  # dp[b]: the best value using exactly b steps of extra cost (or fewer, after the max below)
    choices = []
    for vals, cs, floor in zip(values, costs, floors, strict=True):
        units = [math.ceil((c - floor) / step - 1e-9) for c in cs]
        new = np.full(size, -np.inf)
        choice = np.zeros(size, dtype=np.int64)
        for j, (v, u) in enumerate(zip(vals, units, strict=True)):
            if u >= size:
                continue
            cand = np.full(size, -np.inf)
            cand[u:] = dp[: size - u] + v
            better = cand > new + 1e-12
            new[better], choice[better] = cand[better], j
        dp = new
        choices.append((choice, units))
    b = int(np.argmax(dp))  # first maximum: the least cost among equal values
    out = []
    for choice, units in reversed(choices):
        j = int(choice[b])
        out.append(j)
        b -= units[j]
    return out[::-1]


def values_of(scores: Tensor, weight: float = 1.0) -> np.ndarray:
    """(n + 1,) value of keeping the top 0..n channels of a group with `scores` (n,) (higher = keep): the log of the
    share of the group's score mass they hold, times `weight` (keeping none: -inf).

    Criteria score each group on its own scale, so a channel's value is only comparable inside its group. The
    planner weights each group by its charged time at full width. The log makes the value strictly concave in the
    kept share: where time is linear in width and scores are equal, the most value under a budget is then the uniform
    cut (sum_g w_g log r_g under sum_g w_g r_g <= B is largest at equal r_g), and the knapsack departs from it only
    where the table (a width that runs faster than a wider one) or the scores (a group whose mass sits in few
    channels) give it reason to. The share itself (linear) makes every plan of equal time equally good there, and
    the knapsack's choice among them was arbitrary and extreme: it stripped some groups to their limit, and lost
    far more accuracy than the uniform cut at the same latency (benchmarks/README.md, latency_target). Counting
    channels instead (every channel worth 1) strips the groups whose channels cost most.
    """
    s = scores.detach().double().cpu()
    s = s - min(0.0, float(s.min()))
    s = s / s.sum() if float(s.sum()) > 0 else torch.full_like(s, 1.0 / len(s))
    share = torch.cumsum(torch.sort(s, descending=True).values, 0).clamp(max=1.0).numpy()
    if weight == 0:  # a group charged no time: every width is worth the same (0 * log 0 would be NaN)
        return np.zeros(len(share) + 1)
    with np.errstate(divide="ignore"):
        return weight * np.log(np.concatenate([[0.0], share]))


# ------------------------------------------------------------------------------------------------ the planner
@dataclass
class LatencyPlanner:
    """The per-group latency costs of a model's groups (timed layers charged to one group each) at candidate widths.

    candidates[g]: the widths tried for group g, from its full width down to the narrowest the constraints allow
    (about 32 of them). owned[g]: the timed layers charged to g.
    """

    cost: CostModel
    table: LatencyTable
    groups: list[ChannelGroup]
    round_to: int = 1
    max_ratio: float = 0.9
    candidates: dict[str, list[int]] = field(default_factory=dict)
    owned: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self):
        from prune_cli.selection.plan import kept_count

        ids = {g.id for g in self.groups}
        self.owned = {g.id: [] for g in self.groups}
        for name in self.table.timer.convs:
            touch = self.cost.touch.get(name, [])
            outs = [gid for gid, dim, _ in touch if dim == "out" and gid in ids]
            ins = [gid for gid, dim, _ in touch if dim == "in" and gid in ids]
            if outs or ins:
                self.owned[(outs or ins)[0]].append(name)
        for g in self.groups:
            lowest = kept_count(g.size, self.max_ratio, self.round_to, self.max_ratio)
            stride = self.round_to if g.size >= self.round_to > 1 else max(1, g.size // 32)
            widths = [g.size, *(w for w in range(g.size - 1, lowest - 1, -1) if w % stride == 0)]
            self.candidates[g.id] = widths if widths[-1] == lowest else [*widths, lowest]

    @property
    def full(self) -> dict[str, int]:
        return {g.id: g.size for g in self.groups}

    @property
    def narrowest(self) -> dict[str, int]:
        return {g.id: self.candidates[g.id][-1] for g in self.groups}

    def costs(self, ref: Mapping[str, int]) -> dict[str, np.ndarray]:
        """Per group, (n_candidates,) ms of its layers at each candidate width, the other groups at `ref`."""
        shapes = [
            (name, *self.cost.layer_widths(name, {**ref, g.id: w})[:2])
            for g in self.groups for w in self.candidates[g.id] for name in self.owned[g.id]
        ]  # fmt: skip
        self.table.measure(shapes)
        return {
            g.id: np.array([sum(self.table.ms(name, *self.cost.layer_widths(name, {**ref, g.id: w})[:2])
                                for name in self.owned[g.id]) for w in self.candidates[g.id]])
            for g in self.groups
        }  # fmt: skip

    def predicted(self, counts: Mapping[str, int], costs: Mapping[str, np.ndarray]) -> float:
        """The charged time (ms) of a plan whose widths are candidates, from `costs`."""
        return float(sum(costs[g.id][self.candidates[g.id].index(counts[g.id])] for g in self.groups))

    def by_scores(self, scores: Scores, budget: float, costs: Mapping[str, np.ndarray]) -> dict[str, int]:
        """The candidate widths with the most value (`values_of`: score mass weighted by the group's time) whose
        charged time fits `budget` (ms); the narrowest widths where nothing fits."""
        values = [
            values_of(scores.per_group.get(g.id, torch.ones(g.size)), float(costs[g.id][0]))[self.candidates[g.id]]
            for g in self.groups
        ]
        try:
            picks = knapsack(values, [costs[g.id] for g in self.groups], budget)
        except ValueError:
            return self.narrowest
        return {g.id: self.candidates[g.id][j] for g, j in zip(self.groups, picks, strict=True)}

    def by_ratios(self, ratios: Mapping[str, float], budget: float, costs: Mapping[str, np.ndarray]) -> dict[str, int]:
        """Per-group ratios scaled by the least common factor whose plan (rounded down to candidate widths) fits
        `budget`; the narrowest widths where nothing fits."""
        from prune_cli.selection.plan import kept_count

        rel = {g.id: max(0.0, float(ratios.get(g.id, 0.0))) for g in self.groups}
        top = max(rel.values())
        rel = {gid: r / top if top > 0 else 1.0 for gid, r in rel.items()}  # all zero: one uniform ratio

        def at(t: float) -> dict[str, int]:
            counts = {g.id: kept_count(g.size, t * rel[g.id], self.round_to, self.max_ratio) for g in self.groups}
            return FW.snap(counts, self.candidates)

        hi = self.max_ratio / min((r for r in rel.values() if r > 0), default=1.0)
        if self.predicted(at(hi), costs) > budget:
            return self.narrowest
        lo = 0.0
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if self.predicted(at(mid), costs) <= budget else (mid, hi)
        return at(hi)


Measure = Callable[[list[Mapping[str, int]]], tuple[float, list[float]]]
"""measure(plans as kept counts) -> (base ms, [ms of each plan]), the base and the plans timed in alternating turns."""


@dataclass
class LatencyResult:
    counts: dict[str, int]
    requested: float
    achieved: float
    base_ms: float
    pruned_ms: float
    rounds: list[dict]
    table: dict


def reachable(
    planner: LatencyPlanner, measure: Measure, reduction: float, batch: int, tolerance: float
) -> tuple[float, float]:
    """(the measured reduction of the narrowest plan the constraints allow, the base's ms); raises TargetUnreachable
    (before any scoring) when `reduction` is beyond that reduction by more than `tolerance`."""
    base_ms, (least_ms,) = measure([planner.narrowest])
    best = 1 - least_ms / base_ms
    if reduction > best + tolerance:
        raise TargetUnreachable(
            f"cannot remove {reduction:.1%} of the latency at batch {batch}: the most the constraints allow is "
            f"{best:.1%}, measured (raise --max-ratio, use --scope all, or lower the target)"
        )
    return best, base_ms


def plan(
    planner: LatencyPlanner, measure: Measure, reduction: float, *, scores: Scores | None = None,
    ratios: Mapping[str, float] | None = None, tolerance: float = 0.02, rounds: int = 6, most: float | None = None,
    log: Callable[[str], None] = lambda m: None,
) -> LatencyResult:  # fmt: skip
    """Kept counts per group whose measured latency is `reduction` below the base's, within `tolerance` if it can
    be found in `rounds` measurements (the closest measured plan otherwise).

    Exactly one of `scores` (the knapsack) and `ratios` (per-group ratios scaled to the budget) is given. `most`: the
    measured reduction of the narrowest plan (`reachable`), if known.

    The budget is in charged milliseconds of the table, which need not be the model's milliseconds (the table times
    layers alone, at their fastest pass; the rest of a forward pass is not in it), so it is found by regula falsi
    on measured reductions (Illinois variant), starting from the bracket [narrowest plan: `most`, full model: 0].
    """
    solve = (lambda b, c: planner.by_scores(scores, b, c)) if scores is not None else (
        lambda b, c: planner.by_ratios(ratios or {}, b, c))  # fmt: skip
    if most is None:
        base_ms, (least,) = measure([planner.narrowest])
        most = 1 - least / base_ms

    def bracket(costs: Mapping[str, np.ndarray]) -> tuple[list[float], list[float]]:
        """([budget, reduction] of the cheapest plan, of the full model). The cheapest plan is charged each group's
        least cost, not the narrowest width's: at batch 64 a very narrow conv can cost more than the full one (the
        narrowest ResNet-56 plan was charged 104 ms against the full model's 99), and a bracket from the narrowest
        plan then ran the wrong way and ended at the full model. Its reduction is taken as the narrowest's."""
        return [float(sum(c.min() for c in costs.values())), most], [planner.predicted(planner.full, costs), 0.0]

    def between(lo: list[float], hi: list[float]) -> float:
        if lo[1] <= hi[1]:  # noise: no slope to follow
            return (lo[0] + hi[0]) / 2
        return lo[0] + (reduction - lo[1]) * (hi[0] - lo[0]) / (hi[1] - lo[1])

    # Each layer is charged at the full width of its other group: an upper bound on its time, so the knapsack never
    # favours a width for a charge that the plan's own widths would make wrong (re-costing around a first plan did:
    # it undercharged the layers after a group the next plan kept wide, and the budget -> latency map lost its order).
    costs = planner.costs(planner.full)
    lo, hi = bracket(costs)
    budget = between(lo, hi)
    tried: list[dict] = []
    best: tuple[float, dict[str, int], dict] | None = None
    last_side: bool | None = None
    for _ in range(rounds):
        counts = solve(budget, costs)
        base_ms, (ms,) = measure([counts])
        achieved = 1 - ms / base_ms
        row = {"budget_ms": budget, "base_ms": base_ms, "pruned_ms": ms, "achieved": achieved}
        tried.append(row)
        log(f"latency target {reduction:.3f}: table budget {budget:.3f} ms -> measured reduction {achieved:.3f} "
            f"({ms:.3f} ms vs {base_ms:.3f} ms)")  # fmt: skip
        if best is None or abs(achieved - reduction) < abs(best[0] - reduction):
            best = (achieved, counts, row)
        if abs(achieved - reduction) <= tolerance:
            break
        side = achieved > reduction
        if side:
            lo = [budget, achieved]
        else:
            hi = [budget, achieved]
        if side == last_side:  # Illinois: halve the stale end's miss, or regula falsi creeps from one side
            stale = hi if side else lo
            stale[1] = reduction + (stale[1] - reduction) / 2
        last_side = side
        new = between(lo, hi)
        if abs(new - budget) <= 1e-6 * max(1.0, abs(budget)):  # nothing left to try between the bracket's ends
            break
        budget = new
    assert best is not None
    achieved, counts, row = best
    info = {"key": planner.table.key, "timed": planner.table.timed, "reused": planner.table.reused,
            "timing_s": planner.table.timing_s}  # fmt: skip
    return LatencyResult(counts, reduction, achieved, row["base_ms"], row["pruned_ms"], tried, info)


def plan_timer(
    base: nn.Module, example_input: Tensor, groups: list[ChannelGroup], pool: Tensor, batch: int, *,
    seconds: float = 1.0, runtime: str = "torch",
) -> Measure:  # fmt: skip
    """A `Measure` that builds each plan's model (the lowest-index channels: their time does not depend on which)
    and times it against `base` at `batch` on `pool` (N, C, H, W) images, in alternating turns."""
    from prune_cli import metrics, surgery

    def measure(plans: list[Mapping[str, int]]) -> tuple[float, list[float]]:
        sizes = {g.id: g.size for g in groups}
        models = [base]
        for counts in plans:
            keep = {gid: torch.arange(k) for gid, k in counts.items() if k < sizes[gid]}
            models.append(surgery.prune(base, example_input, keep, groups=groups))
        runnable = [as_runtime(m, runtime, example_input) for m in models]
        timed = metrics.latency_in_turns(runnable, pool, batch, max_seconds=seconds * len(models) / 2, rounds=4)
        return timed[0][0], [t[0] for t in timed[1:]]

    return measure


def as_runtime(model: nn.Module, runtime: str, example_input: Tensor) -> Callable[[Tensor], Tensor]:
    """`model` itself for torch; an ONNX Runtime session wrapped as a callable for onnxruntime."""
    if runtime == "torch":
        return model
    if runtime == "onnxruntime":
        from prune_cli.store import onnx as export

        return export.OrtModel(model, example_input)
    raise BadValue(f"--runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")


def to_selection(planner: LatencyPlanner, result: LatencyResult, scores: Scores, batch: int, runtime: str):
    """The `selection.Selection` of a latency result: the top-scoring channels at its counts, its MACs and params,
    and the latency requested and measured (metric "latency")."""
    from prune_cli.api import Target
    from prune_cli.selection.plan import finish

    sel = finish(planner.cost, planner.groups, scores, result.counts, Target("macs", 0.0))
    sel.metric, sel.requested, sel.achieved = "latency", result.requested, result.achieved
    sel.extra = {
        "latency_batch": batch, "runtime": runtime, "base_ms": result.base_ms, "pruned_ms": result.pruned_ms,
        "macs_reduction": 1 - sel.macs / sel.base_macs, "rounds": result.rounds, "table": result.table,
    }  # fmt: skip
    return sel


def selector(
    base: nn.Module, example_input: Tensor, groups: list[ChannelGroup], splits, job, device: torch.device,
    log: Callable[[str], None] = lambda m: None,
) -> Callable:  # fmt: skip
    """For `pruning.run`: measure the base against the narrowest plan allowed (refusing an unreachable target
    before any scoring), and return the selection under `job.target_latency`: (scores, allocation or None) ->
    `selection.Selection`."""
    from prune_cli.data import splits as D
    from prune_cli.selection import plan as selection

    batch, tolerance = job.latency_batch, 0.02
    pool = D.to_float(splits.test.x[: max(256, 2 * batch)], splits, device=device)
    table = LatencyTable(base, example_input, batch, cache=cache_dir())
    planner = LatencyPlanner(CostModel(base, example_input), table, groups, job.round_to, job.max_ratio)
    measure = plan_timer(base, example_input, groups, pool, batch, seconds=job.latency_seconds, runtime=job.runtime)
    log(f"timing the base against the narrowest plan allowed at batch {batch} ({job.runtime}, --target-latency)")
    most, _ = reachable(planner, measure, job.target_latency, batch, tolerance)

    def select(scores: Scores, allocation) -> selection.Selection:
        if allocation is not None and allocation.exact:
            log(f"--target-latency ignored: {job.criterion}'s per-group ratios are exact")
            return selection.select(base, example_input, groups, scores, job.target, ratios=allocation,
                                    round_to=job.round_to, max_ratio=job.max_ratio)  # fmt: skip
        log(f"latency table at batch {batch}: {table.path or 'not cached'}")
        result = plan(
            planner, measure, job.target_latency, scores=scores if allocation is None else None,
            ratios=allocation.ratios if allocation is not None else None, tolerance=tolerance, most=most, log=log,
        )  # fmt: skip
        table.save()
        log(f"latency table: {table.timed} layer shapes timed, {table.reused} reused from the cache "
            f"({table.timing_s:.1f} s)")  # fmt: skip
        sel = to_selection(planner, result, scores, batch, job.runtime)
        sel.extra["most_reachable"] = most
        return sel

    return select
