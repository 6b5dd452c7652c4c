"""`sensitivity`: per-group pruning ratios from a damage sweep. Lu, Gong, Zhao, Feng, Li, "SBPF: Sensitiveness
Based Pruning Framework For Convolutional Neural Network On Image Classification" (arXiv 2208.04588); the sweep
follows Intel Distiller's sensitivity analysis, the closest public anchor (SBPF has no public code or full text,
see shared/reference/methods_static.md section 2). Returns an `Allocation`; channels inside a group are ranked by
the criterion named by `rank` (default `l1`) in the shared selection.

Decisions (METHODS.md section 2; every one is an option):

- Damage of group g at level d, trial t: `random` (default) zeroes a random floor(d*C) of the group's channels in
  every producer (weights and bias) and in every BatchNorm of the group (gamma and beta), so those channel
  outputs are exactly 0; `l1` zeroes the lowest-L1 channels instead (deterministic, so only trial 0 is run);
  `noise` adds N(0, (d * std W_g)^2) to the group's producer weights. A coupled group (ResNet residual channels,
  scope `all`) is always damaged as a whole: all its producers at once, which per-tensor tools get wrong.
- Seeds: trial t of level d of group g draws from `ctx.generator(crc32("g|d|t"))`, so a (g, d, t) damage is
  the same whichever other groups are in scope.
- S_g = mean over (d, t) of the top-1 accuracy drop on the calibration split (held-out training images, never
  the test split); `measure=loss` uses the mean cross-entropy increase. No BN recalibration, no fine-tuning.
- Layers: `conv` (default) sweeps and prunes only groups whose producers are convolutions, as SBPF measures the
  sensitivity of convolutional layers; every other group (a VGG's hidden Linear) gets ratio 0 and is not pruned.
  `all` sweeps and allocates every group in scope. Why the default: the hidden Linear of VGG-11 barely moves the
  arg-max when damaged, so `inverse` sent it to the cap, and L1 ranking then kept the wrong units.
- Ratios: `linear` (default) r_g = clip(alpha * (1 - S_g / max S), 0, max_ratio), so the most sensitive group
  is not cut; `inverse` r_g = clip(alpha * (1/S_g) / mean(1/S), 0, max_ratio). Sensitivities below
  `min_sensitivity` (damage that does not hurt on the calibration split, or even helps by chance) count as
  `min_sensitivity`, which keeps 1/S finite. `cost_aware` (default on) weighs each group's relative ratio by c_g,
  the share of the MACs (params) that removing the whole group would save, so that a cheap group cannot absorb the
  cut that the expensive ones would have to pay for. With `inverse`, r_g ~ c_g / S_g minimises
  sum_g S_g r_g^2 under the linearised budget sum_g c_g r_g = target; plain `inverse` is the same minimiser for a
  budget that counts every group's ratio alike. Why the defaults: on Fashion-MNIST ResNet-20 and VGG-11 at -30%
  and -50% MACs without fine-tuning, linear + cost-aware read best on average, and `inverse` fell 17-21 pt behind
  on ResNet-20 at -50% by sending the least sensitive groups near the cap
  (experiments/results/fmnist-vgg/sensitivity-defaults/README.md).
  alpha is bisected on the exact cost model until the MACs (params) target is met; the returned ratios are the
  ones at that alpha (the shared selection rescales them again only if its round-to / max-ratio differ).

Reuse: damage to group g changes nothing computed before the first graph node that reads a damaged module. The
model is traced once with torch.fx; per group the graph is cut at that node (`api.graph.split`) into a prefix, which
returns every value still needed later (in a ResNet, the block input as well as the running residual), and a suffix
that takes those values. Per calibration batch the prefix runs once and the suffix once per (level, trial), so a
sweep costs about (1 + sum over groups of the suffix share) full passes per evaluation rather than one each.
Untraceable models (or `reuse=false`) evaluate the whole damaged model every time; the results are the same.

The sweep rows (group, level, trial, accuracy, loss), S per group, the baseline and alpha are in
`Allocation.extra` for `prune-cli score`.
"""

from __future__ import annotations

import copy
import math
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from prune_cli.api import Allocation, ChannelGroup, Context, Criterion, get_criterion, register_criterion
from prune_cli.api.graph import CostModel, split, trace, writes_in_place
from prune_cli.api.selection import kept_count
from prune_cli.errors import BadValue, UnsupportedGraph

LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@register_criterion()
class Sensitivity(Criterion):
    name = "sensitivity"
    paper = "2208.04588"
    needs = frozenset({"data", "labels"})
    summary = "per-group ratios inversely proportional to the accuracy drop when the group is damaged"

    @dataclass(frozen=True)
    class Options:
        levels: tuple[float, ...] = LEVELS
        trials: int = 3
        damage: Literal["random", "l1", "noise"] = "random"
        measure: Literal["accuracy", "loss"] = "accuracy"
        form: Literal["inverse", "linear"] = "linear"
        cost_aware: bool = True  # weigh each group's ratio by its share of the MACs (params)
        layers: Literal["conv", "all"] = "conv"
        rank: str = "l1"
        max_ratio: float = 0.9
        min_sensitivity: float = 1e-3
        batch_size: int = 256
        reuse: bool = True  # cut the traced graph before each group (same results, less work)

        def __post_init__(self):
            if not self.levels or not all(0.0 < d < 1.0 for d in self.levels):
                raise BadValue(f"sensitivity: levels must be in (0, 1), got {self.levels}")
            if self.trials < 1 or self.batch_size < 1:
                raise BadValue("sensitivity: trials and batch_size must be >= 1")
            if not 0.0 < self.max_ratio < 1.0:
                raise BadValue(f"sensitivity: max_ratio must be in (0, 1), got {self.max_ratio}")
            if not self.min_sensitivity > 0:
                raise BadValue(f"sensitivity: min_sensitivity must be > 0, got {self.min_sensitivity}")
            for name, value, choices in (("damage", self.damage, ("random", "l1", "noise")),
                                         ("measure", self.measure, ("accuracy", "loss")),
                                         ("form", self.form, ("inverse", "linear")),
                                         ("layers", self.layers, ("conv", "all"))):  # fmt: skip
                if value not in choices:
                    raise BadValue(f"sensitivity: {name} must be one of {', '.join(choices)}, not {value!r}")

    def run(self, ctx: Context) -> Allocation:
        t0 = time.perf_counter()
        o = self.options
        groups = allocated_groups(ctx.groups, o.layers)
        if not groups:
            raise BadValue("sensitivity: no convolutional channel group in scope; try --opt layers=all")
        base, rows, reused = sweep(ctx, o, groups)
        key = "accuracy" if o.measure == "accuracy" else "loss"
        sens = {}
        for g in groups:
            vals = [r[key] for r in rows if r["group"] == g.id]
            drop = [base[key] - v if key == "accuracy" else v - base[key] for v in vals]
            sens[g.id] = sum(drop) / len(drop)
        cost = ctx.cost_model()
        shares = cost_shares(cost, groups, ctx.target.metric)
        rel = relative_ratios(sens, o, shares)
        rel.update({g.id: 0.0 for g in ctx.groups if g.id not in rel})  # groups outside `layers` are not pruned
        alpha, ratios = fit_alpha(ctx, rel, o.max_ratio, cost)
        extra = {
            "sweep": rows, "sensitivity": sens, "cost_share": shares, "relative": rel, "baseline": base,
            "alpha": alpha, "evaluations": len(rows), "reuse": reused, "sweep_s": time.perf_counter() - t0,
        }  # fmt: skip
        return Allocation(ratios, rank=o.rank, extra=extra)


# ------------------------------------------------------------------------------------------------ ratios
def is_conv_group(g: ChannelGroup) -> bool:
    """Whether every producer of the group's channels is a convolution (conv out-channels or depthwise)."""
    return bool(g.producers) and all(m.kind in ("conv_out", "depthwise") for m in g.producers)


def allocated_groups(groups: tuple[ChannelGroup, ...], layers: str) -> list[ChannelGroup]:
    """The groups that are swept and given a ratio: conv groups only (`conv`) or all in scope (`all`)."""
    return [g for g in groups if layers == "all" or is_conv_group(g)]


def cost_shares(cost: CostModel, groups: list[ChannelGroup], metric: str) -> dict[str, float]:
    """c_g: the share of the model's MACs (params) that removing all of group g would save, the others intact.

    A group's cost is linear in its kept count when the other groups keep all their channels, so keeping one
    channel and scaling by size / (size - 1) gives the whole group's share (a group of 1 channel saves nothing).
    """
    base = cost.base(metric)
    shares = {}
    for g in groups:
        saved = base - cost.metric({g.id: 1}, metric)
        shares[g.id] = saved * g.size / (g.size - 1) / base if g.size > 1 else 0.0
    return shares


def relative_ratios(sens: dict[str, float], o: Sensitivity.Options, shares: dict[str, float]) -> dict[str, float]:
    """Unscaled ratios (before alpha): inverse -> (1/S_g) / mean(1/S); linear -> 1 - S_g / max S; each times
    c_g / mean(c) when cost-aware (c: the groups' shares of the cost)."""
    if o.form == "inverse":
        inv = {g: 1.0 / max(s, o.min_sensitivity) for g, s in sens.items()}
        mean = sum(inv.values()) / len(inv)
        rel = {g: v / mean for g, v in inv.items()}
    else:
        top = max(max(sens.values()), o.min_sensitivity)
        rel = {g: 1.0 - max(s, 0.0) / top for g, s in sens.items()}
        if not any(v > 0 for v in rel.values()):  # one group, or all equally sensitive: an equal cut, not none
            rel = dict.fromkeys(rel, 1.0)
    if o.cost_aware:
        mean_share = sum(shares[g] for g in rel) / len(rel)
        rel = {g: r * shares[g] / mean_share if mean_share > 0 else 0.0 for g, r in rel.items()}
    return rel


def fit_alpha(
    ctx: Context, rel: dict[str, float], max_ratio: float, cost: CostModel | None = None
) -> tuple[float, dict[str, float]]:
    """Smallest alpha whose ratios clip(alpha * rel, 0, max_ratio) meet the target (bisection on the cost model).

    An unreachable target returns the most pruning allowed; the selection then reports it to the user.
    """
    cost = cost or ctx.cost_model()
    sizes = {g.id: g.size for g in ctx.groups}
    base = cost.base(ctx.target.metric)

    def ratios_at(alpha: float) -> dict[str, float]:
        return {g: min(max(alpha * r, 0.0), max_ratio) for g, r in rel.items()}

    def reduction(alpha: float) -> float:
        kept = {g: kept_count(sizes[g], r, 1, max_ratio) for g, r in ratios_at(alpha).items()}
        return 1 - cost.metric(kept, ctx.target.metric) / base

    positive = [r for r in rel.values() if r > 0]
    if not positive:
        return 0.0, ratios_at(0.0)
    lo, hi = 0.0, max_ratio / min(positive)
    if reduction(hi) + 1e-9 < ctx.target.reduction:
        ctx.log(f"sensitivity: the target is out of reach; ratios at the most pruning allowed ({reduction(hi):.1%})")
        return hi, ratios_at(hi)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if reduction(mid) >= ctx.target.reduction else (mid, hi)
    return hi, ratios_at(hi)


# ------------------------------------------------------------------------------------------------- sweep
def sweep(
    ctx: Context, o: Sensitivity.Options, groups: list[ChannelGroup] | None = None
) -> tuple[dict[str, float], list[dict], bool]:
    """(baseline {accuracy, loss}, rows {group, level, trial, accuracy, loss}, whether the graph cut was used).

    Sweeps `groups` (default: every group in the context). Works on a private copy of the model: the context's
    model is never modified.
    """
    groups = list(ctx.groups) if groups is None else groups
    calib = ctx.require_calib()
    model = copy.deepcopy(ctx.model).eval()
    l1 = get_criterion("l1")().run(ctx).per_group if o.damage == "l1" else {}
    runner = _Runner(model, o.reuse, ctx.log)
    trials = 1 if o.damage == "l1" else o.trials  # the l1 damage has no randomness: more trials repeat trial 0
    jobs = [(d, t) for d in o.levels for t in range(trials)]
    batches = list(calib.batches(o.batch_size))
    advance = ctx.progress("sensitivity sweep", len(groups) * len(jobs) * len(batches))

    with torch.no_grad():
        base = _Tally()
        for x, y in batches:
            base.add(model(x), y)
        rows = []
        for g in groups:
            prefix, suffix = runner.split(_damaged_modules(g))
            tallies = {job: _Tally() for job in jobs}
            for x, y in batches:
                live = prefix(x)
                for d, t in jobs:
                    patches = _damage(model, g, d, t, o.damage, ctx, l1.get(g.id))
                    saved = [p.apply() for p in patches]
                    try:
                        tallies[(d, t)].add(suffix(live), y)
                    finally:
                        for p, s in zip(reversed(patches), reversed(saved), strict=True):
                            p.restore(s)
                    advance(1)
            rows += [{"group": g.id, "level": d, "trial": t, **tallies[(d, t)].result()} for d, t in jobs]
    return base.result(), rows, runner.traced is not None


class _Tally:
    """Running top-1 hits and summed cross-entropy over batches."""

    def __init__(self):
        self.hits, self.loss, self.n = 0, 0.0, 0

    def add(self, logits: Tensor, y: Tensor) -> None:
        y = y.to(logits.device)
        self.hits += int((logits.argmax(1) == y).sum())
        self.loss += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        self.n += len(y)

    def result(self) -> dict[str, float]:
        return {"accuracy": self.hits / self.n, "loss": self.loss / self.n}


# ------------------------------------------------------------------------------------------------ damage
@dataclass
class _Patch:
    """Rows of one tensor replaced in place (None: zeroed); `apply` returns the old rows for `restore`."""

    tensor: Tensor
    rows: Tensor
    values: Tensor | None = None

    def apply(self) -> Tensor:
        old = self.tensor[self.rows].clone()
        self.tensor[self.rows] = 0 if self.values is None else self.values
        return old

    def restore(self, old: Tensor) -> None:
        self.tensor[self.rows] = old


def _damaged_modules(g: ChannelGroup) -> set[str]:
    return {m.module for m in g.producers + g.norms}


def _damage(model: nn.Module, g: ChannelGroup, level: float, trial: int, how: str, ctx: Context,
            l1: Tensor | None) -> list[_Patch]:  # fmt: skip
    """The patches that damage group g at this level and trial (deterministic for the run's seed)."""
    gen = ctx.generator(zlib.crc32(f"{g.id}|{level:.6f}|{trial}".encode()))
    modules = dict(model.named_modules())
    k = math.floor(level * g.size + 1e-9)
    if how == "noise":
        patches = []
        for m in g.producers:
            w = modules[m.module].weight.data
            rows = torch.arange(m.offset, m.offset + g.size, device=w.device)
            cur = w[rows]
            noise = torch.randn(cur.shape, generator=gen).to(w.device, w.dtype) * (level * float(cur.std()))
            patches.append(_Patch(w, rows, cur + noise))
        return patches
    if how == "l1":
        chan = torch.sort(l1.double(), stable=True).indices[:k]  # lowest L1 first
    else:
        chan = torch.randperm(g.size, generator=gen)[:k]
    patches = []
    for m in g.producers + g.norms:
        mod = modules[m.module]
        for p in (mod.weight, getattr(mod, "bias", None)):
            if p is not None:
                patches.append(_Patch(p.data, (chan + m.offset).to(p.device)))
    return patches


# ------------------------------------------------------------------------------------------------ graph cut
class _Runner:
    """Splits the traced model before the first node that reads a damaged module (see the module docstring)."""

    def __init__(self, model: nn.Module, reuse: bool, log: Callable[[str], None]):
        self.model = model
        self.traced: fx.GraphModule | None = None
        if reuse:
            try:
                self.traced = trace(model, "the sensitivity sweep's reuse")
            except UnsupportedGraph as exc:  # the sweep still works on the whole model
                log(f"sensitivity: {exc}; evaluating it whole")

    def split(self, touched: set[str]) -> tuple[Callable[[Tensor], tuple], Callable[[tuple], Tensor]]:
        if self.traced is None:
            return (lambda x: (x,)), (lambda live: self.model(live[0]))
        nodes = list(self.traced.graph.nodes)
        at = next((i for i, n in enumerate(nodes) if _reads(n, touched)), None)
        if at is None:  # the damaged modules are never called: nothing to reuse, but still correct
            return (lambda x: (x,)), (lambda live: self.model(live[0]))
        prefix, suffix = split(self.traced, at)
        if writes_in_place(suffix):  # the suffix may write into a cached value: give it a copy each time
            return prefix, lambda live: suffix(*(v.clone() if isinstance(v, Tensor) else v for v in live))
        return prefix, lambda live: suffix(*live)


def _reads(n: fx.Node, touched: set[str]) -> bool:
    if n.op not in ("call_module", "get_attr"):
        return False
    target = str(n.target)
    return any(target == m or target.startswith(m + ".") for m in touched)
