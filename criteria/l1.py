"""L1-norm filter pruning: Li, Kadav, Durdanovic, Samet, Graf, "Pruning Filters for Efficient ConvNets",
ICLR 2017 (arXiv 1608.08710).

Score of producer filter j: sum of |W[j]| over in-channels and kernel (weights only, no BatchNorm folding, as in
the paper). A group with several producers (residual groups, scope `all`) averages its members' scores after
dividing each member by its mean (`reduce=mean`, default) or sums the raw scores (`reduce=sum`).

`greedy` (paper section 3.3) scores a filter only over the input channels kept in the previous layer. The kept
set of the previous layer depends on the budget, so it is estimated here with the uniform ratio that the MACs
target implies when both widths of a layer shrink, r = 1 - sqrt(1 - target); groups are processed shallow to
deep. The final plan is still made by the shared selection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from prune_cli.api import Context, Criterion, Scores, register_criterion


@register_criterion()
class L1(Criterion):
    name = "l1"
    paper = "1608.08710"
    needs = frozenset()
    summary = "sum of absolute filter weights (higher = keep)"

    @dataclass(frozen=True)
    class Options:
        mode: Literal["independent", "greedy"] = "independent"
        reduce: Literal["mean", "sum"] = "mean"

    def run(self, ctx: Context) -> Scores:
        modules = dict(ctx.model.named_modules())
        removed_inputs: dict[str, Tensor] = {}  # consumer module -> boolean mask of its pruned in-channels
        scores = {}
        for g in ctx.groups:  # groups come in graph order: shallow to deep
            per_member = []
            for m in g.producers:
                w = modules[m.module].weight.detach()
                mask = removed_inputs.get(m.module)
                if self.options.mode == "greedy" and mask is not None and w.dim() == 4 and w.shape[1] == len(mask):
                    w = w[:, ~mask]
                s = w.abs().flatten(1).sum(1)[m.offset : m.offset + g.size].double()
                per_member.append(s / s.mean().clamp_min(1e-12) if self.options.reduce == "mean" else s)
            score = torch.stack(per_member).mean(0) if self.options.reduce == "mean" else torch.stack(per_member).sum(0)
            scores[g.id] = score.float()
            if self.options.mode == "greedy":
                ratio = 1 - math.sqrt(ctx.target.keep)
                k = max(1, math.ceil(g.size * (1 - ratio)))
                removed = torch.ones(g.size, dtype=torch.bool)
                removed[torch.sort(-score, stable=True).indices[:k]] = False
                for c in g.consumers:
                    if c.kind == "conv_in" and c.offset == 0:
                        removed_inputs[c.module] = removed
        return Scores(scores)
