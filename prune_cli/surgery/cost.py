"""Predicted MACs and parameters of any keep-plan, in microseconds, for the selection's bisection.

Counting as in metrics.py (conv + linear only; MACs per image): a conv costs out * in/groups * k * H_out * W_out
MACs and out * in/groups * k (+ out bias) parameters; a linear in * out (+ out). A group's removal lowers the
"out" or "in" width of every layer it touches by the removed channels times the member's `expand`.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from prune_cli.api import ChannelGroup
from prune_cli.surgery.graph import analyse

_OUT = ("conv_out", "linear_out", "depthwise")
_IN = ("conv_in", "linear_in", "depthwise")


class CostModel:
    """MACs / params of `model` as a function of the kept channel count of each group."""

    def __init__(self, model: nn.Module, example_input: Tensor):
        traced = analyse(model, example_input)
        self.groups: list[ChannelGroup] = traced.groups
        self.sizes = {g.id: g.size for g in self.groups}
        self.layers = traced.layer_info
        # layer -> [(group id, "out"|"in", expand)]
        self.touch: dict[str, list[tuple[str, str, int]]] = {name: [] for name in self.layers}
        for g in self.groups:
            for m in g.members:
                if m.module in self.touch:
                    if m.kind in _OUT:
                        self.touch[m.module].append((g.id, "out", m.expand))
                    if m.kind in _IN:
                        self.touch[m.module].append((g.id, "in", m.expand))
        # group id -> the layers whose width it changes (in layer order)
        self._layers_of = {g.id: [n for n, touches in self.touch.items() if any(t[0] == g.id for t in touches)]
                           for g in self.groups}  # fmt: skip
        self.base_macs, self.base_params = self.cost({})

    def layer_widths(self, name: str, kept: Mapping[str, int]) -> tuple[int, int, int]:
        """(in, out, groups) of layer `name` when group g keeps kept[g] channels (groups not named keep all)."""
        info = self.layers[name]
        out, inp, groups = info["out"], info["in"], info["groups"]
        for gid, dim, expand in self.touch[name]:
            if gid in kept:
                removed = (self.sizes[gid] - kept[gid]) * expand
                if dim == "out":
                    out -= removed
                else:
                    inp -= removed
        if groups > 1 and groups == info["in"] == info["out"]:  # depthwise: width follows its group
            groups = inp = out = min(out, inp)
        return inp, out, groups

    def layers_of(self, group_id: str) -> list[str]:
        """The layers whose width the group changes."""
        return self._layers_of[group_id]

    def cost(self, kept: Mapping[str, int]) -> tuple[int, int]:
        """(MACs, params) when group g keeps kept[g] channels (groups not named keep all)."""
        macs = params = 0
        for name, info in self.layers.items():
            inp, out, groups = self.layer_widths(name, kept)
            per_out = (inp // groups) * info["k"]
            macs += out * per_out * info["hw"]
            params += out * per_out + (out if info["bias"] else 0)
        return macs, params

    def metric(self, kept: Mapping[str, int], metric: str) -> int:
        macs, params = self.cost(kept)
        return macs if metric == "macs" else params

    def base(self, metric: str) -> int:
        return self.base_macs if metric == "macs" else self.base_params
