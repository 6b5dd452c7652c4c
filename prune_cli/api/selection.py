"""The shared selection's pieces, for criteria that choose their own widths: they meet the target the way the
selection does, so their widths compare fairly with those of score-based criteria."""

from __future__ import annotations

import torch

from prune_cli.api import Context, Scores
from prune_cli.selection.plan import bisect, kept_count, select

__all__ = ["bisect", "kept_count", "select", "uniform_counts"]


def uniform_counts(ctx: Context, max_ratio: float = 0.9) -> dict[str, int]:
    """Kept channels per group in scope for the one uniform ratio that meets ctx.target (the shared selection's
    bisection on the cost model): the widths `l1` with uniform selection would give."""
    zeros = Scores({g.id: torch.zeros(g.size) for g in ctx.groups})
    sel = select(ctx.model, ctx.example_input, list(ctx.groups), zeros, ctx.target, mode="uniform",
                 max_ratio=max_ratio, cost=ctx.cost_model())  # fmt: skip
    return {g.id: len(sel.keep[g.id]) if g.id in sel.keep else g.size for g in ctx.groups}
