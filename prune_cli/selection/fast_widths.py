"""Widths the hardware runs fast: each conv layer timed at candidate widths, and per channel group the widths that
run faster than every wider one.

Why: a conv's time does not follow its MACs. On a CPU with oneDNN, a 3x3 conv can take nearly as long with any
width from 17 to 31 channels as with 32, and a quarter to half as long with 16 (measured in benchmarks/README.md,
fast widths). A uniform cut to 23 channels there halves the MACs and buys little time.
Selection with fast widths rounds each group's kept count down to a width that is faster than every wider one, and
its bisection then prunes the other groups less, so the MACs target is still met (NetAdapt and HALP measure layers
in the same spirit).

The times are measured on this machine and device, at one batch size, with random weights and inputs of each
layer's own shape. Layers other than `nn.Conv2d` modules (linear layers, grouped convs that are not depthwise) are
not timed: their widths cost little or cannot change alone.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from prune_cli.api import ChannelGroup
from prune_cli.surgery.cost import CostModel


class LayerTimer:
    """Forward time (ms) of each conv layer of a model at any in/out width, at batch size `batch`.

    A layer with in/out widths (i, o) is timed as a fresh conv of the same kernel, stride, padding and dilation on
    a random (batch, i, H, W) input, H x W being the layer's input size for `example_input`. Equal shapes are timed
    once per process (`score --criterion all` selects seven times). `seconds` bounds each timing (at least 2 passes
    after one warm-up; the fastest pass counts, since interference only ever adds time).
    """

    _cache: dict[tuple, float] = {}  # shared by every timer: a shape's time does not depend on the model

    def __init__(self, model: nn.Module, example_input: Tensor, batch: int, *, seconds: float = 0.005):
        self.batch, self.seconds = batch, seconds
        self.device = example_input.device
        self.convs: dict[str, tuple[nn.Conv2d, tuple[int, int]]] = {}
        self._inputs: dict[tuple, Tensor] = {}
        hooks = [
            m.register_forward_pre_hook(lambda m, args, name=name: self._record(name, m, args))
            for name, m in model.named_modules()
            if type(m) is nn.Conv2d and (m.groups == 1 or m.groups == m.in_channels == m.out_channels)
        ]  # fmt: skip
        training = model.training
        try:
            with torch.no_grad():
                model.eval()(example_input)
        finally:
            model.train(training)
            for h in hooks:
                h.remove()

    def _record(self, name: str, m: nn.Conv2d, args: tuple) -> None:
        self.convs[name] = (m, tuple(args[0].shape[-2:]))

    def _key(self, name: str, in_width: int, out_width: int) -> tuple:
        m, hw = self.convs[name]
        return (self.device, torch.get_num_threads(), self.batch, m.kernel_size, m.stride, m.padding, m.dilation,
                m.groups > 1, m.bias is not None, hw, in_width, out_width)  # fmt: skip

    def _time(self, name: str, in_width: int, out_width: int) -> float:
        m, hw = self.convs[name]
        conv = nn.Conv2d(
            in_width, out_width, m.kernel_size, m.stride, m.padding, m.dilation,
            groups=in_width if m.groups > 1 else 1, bias=m.bias is not None,
        ).to(self.device).eval()  # fmt: skip
        shape = (self.batch, in_width, *hw)
        if shape not in self._inputs:  # random numbers cost as much as a small conv
            self._inputs[shape] = torch.randn(shape, device=self.device)
        return _fastest_ms(conv, self._inputs[shape], self.seconds)

    def ms(self, name: str, in_width: int, out_width: int) -> float:
        """Time of layer `name` with these widths (0.0 for a layer that is not timed)."""
        if name not in self.convs:
            return 0.0
        key = self._key(name, in_width, out_width)
        if key not in self._cache:
            self._cache[key] = self._time(name, in_width, out_width)
        return self._cache[key]

    def measure(self, shapes: list[tuple[str, int, int]]) -> None:
        """Time the (layer, in, out) shapes not yet known in two rounds, the second in reverse order, keeping each
        shape's faster round: the machine's speed drifts over seconds, and shapes that are compared with each other
        should not be timed at different speeds."""
        todo = {self._key(*s): s for s in shapes if s[0] in self.convs}
        todo = {key: shape for key, shape in todo.items() if key not in self._cache}
        first = {key: self._time(*shape) for key, shape in todo.items()}
        for key, shape in reversed(todo.items()):
            self._cache[key] = min(first[key], self._time(*shape))


@torch.no_grad()
def _fastest_ms(fn: Callable[[Tensor], Tensor], x: Tensor, seconds: float) -> float:
    def run() -> None:
        fn(x)
        if x.is_cuda:  # the time of the work, not of queueing it
            torch.cuda.synchronize(x.device)

    run()
    best, spent, n = math.inf, 0.0, 0
    while n < 2 or spent < seconds:
        t0 = time.perf_counter()
        run()
        dt = time.perf_counter() - t0
        best, spent, n = min(best, dt), spent + dt, n + 1
    return best * 1e3


def group_ms(cost: CostModel, timer: LayerTimer, group: ChannelGroup, kept: Mapping[str, int]) -> float:
    """Summed time of the timed layers that `group` touches, every group at its width in `kept`."""
    return sum(timer.ms(name, *cost.layer_widths(name, kept)[:2]) for name in cost.layers_of(group.id))


def fast_widths(
    cost: CostModel, timer: LayerTimer, groups: list[ChannelGroup], kept: Mapping[str, int],
    lowest: Mapping[str, int], step: Callable[[int], int] = lambda size: max(1, size // 32), tolerance: float = 0.1,
) -> dict[str, list[int]]:  # fmt: skip
    """Per group, the widths (descending, the full width first) that run at least `tolerance` faster than every
    wider width kept, the other groups at their widths in `kept`; and the narrowest candidate in any case, so that
    rounding down to these widths can reach whatever the candidates reach.

    Candidates run from the full width down to `lowest[g]` in steps of `step(size)` (about 32 candidates at most, so
    that a 512-wide VGG group costs 32 timings per layer shape, not 512).
    """
    out = {}
    for g in groups:
        stride = step(g.size)
        candidates = [g.size, *(w for w in range(g.size - 1, lowest[g.id] - 1, -1) if w % stride == 0)]
        plans = [{**kept, g.id: w} for w in candidates]
        timer.measure([(name, *cost.layer_widths(name, plan)[:2]) for plan in plans for name in cost.layers_of(g.id)])
        widths, best = [], math.inf
        for w, plan in zip(candidates, plans, strict=True):
            t = group_ms(cost, timer, g, plan)
            if t < best * (1 - tolerance):
                widths.append(w)
                best = t
        out[g.id] = widths if widths[-1] == candidates[-1] else [*widths, candidates[-1]]
    return out


def snap(counts: Mapping[str, int], widths: Mapping[str, list[int]]) -> dict[str, int]:
    """Each group's count rounded down to its largest fast width (up to its smallest, where none is lower)."""
    out = dict(counts)
    for gid, ws in widths.items():
        if gid in out:
            out[gid] = next((w for w in ws if w <= out[gid]), ws[-1])
    return out


def give_back(
    cost: CostModel, timer: LayerTimer, groups: list[ChannelGroup], counts: Mapping[str, int],
    widths: Mapping[str, list[int]], fits: Callable[[dict[str, int]], bool],
) -> dict[str, int]:  # fmt: skip
    """Raise groups to their next wider fast width while `fits` (the target) still holds, the least added time per
    added MAC first: rounding down to fast widths overshoots the target, and this returns what it need not cost."""
    counts = dict(counts)
    while True:
        best: tuple[float, dict[str, int]] | None = None
        for g in groups:
            wider = [w for w in widths[g.id] if w > counts[g.id]]
            if not wider:
                continue
            trial = {**counts, g.id: wider[-1]}
            if not fits(trial):
                continue
            added_ms = group_ms(cost, timer, g, trial) - group_ms(cost, timer, g, counts)
            added_macs = cost.metric(trial, "macs") - cost.metric(counts, "macs")
            price = added_ms / max(added_macs, 1)
            if best is None or price < best[0]:
                best = (price, trial)
        if best is None:
            return counts
        counts = best[1]
