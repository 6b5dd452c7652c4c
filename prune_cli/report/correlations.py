"""Rank correlations: how alike two criteria order the channels, and two model files order the layers.

`prune-cli score --criterion all` compares criteria: each needs a per-channel number (`channel_proxy`): its score
(`Scores`); kept 1 / removed 0 at the target (`Plan`); for an `Allocation`, the scores of its `rank` criterion (the
channels it keeps inside a group are the rank criterion's best, so within a group it orders channels exactly as that
criterion: with rank l1 it correlates 1.0 with l1 by construction). `--compare-checkpoint` compares the per-group
sensitivities of two model files (`layer_ranking`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from prune_cli.api import Allocation, ChannelGroup, Context, Plan, Result, Scores, get_criterion
from prune_cli.errors import BadValue


def ranks(values: Sequence[float] | Tensor) -> list[int]:
    """The rank of each value, 1 = largest; ties rank the earlier one first, as the selection keeps them."""
    v = values.tolist() if isinstance(values, Tensor) else list(values)
    rank = [0] * len(v)
    for r, i in enumerate(sorted(range(len(v)), key=lambda i: -v[i]), start=1):
        rank[i] = r
    return rank


def kept_mask(keep: Mapping[str, Tensor], group: ChannelGroup) -> list[int]:
    """1 for each channel of `group` the keep-plan keeps, else 0 (a group the plan leaves out keeps every one)."""
    if group.id not in keep:
        return [1] * group.size
    kept = set(keep[group.id].tolist())
    return [int(c in kept) for c in range(group.size)]


def channel_proxy(result: Result, ctx: Context) -> dict[str, Tensor]:
    """A per-channel number (group id -> (size,)) for rank correlations; see the module docstring for the choice per
    result type."""
    if isinstance(result, Scores):
        return dict(result.per_group)
    if isinstance(result, Allocation):
        rank = get_criterion(result.rank)
        return dict(rank(rank.Options()).run(ctx).per_group)
    assert isinstance(result, Plan)
    return {g.id: torch.tensor(kept_mask(result.keep, g), dtype=torch.float64) for g in ctx.groups}


def spearman_matrix(proxies: Mapping[str, Mapping[str, Tensor]]) -> dict[str, dict[str, float]]:
    """Mean over shared groups of Spearman's rho between two criteria's channel numbers (NaN: no usable group).

    A group where either criterion gives every channel the same number has no ranking and is left out.
    """
    from scipy.stats import spearmanr

    names = list(proxies)
    out: dict[str, dict[str, float]] = {a: {} for a in names}
    for a in names:
        for b in names:
            rhos = []
            for gid in proxies[a].keys() & proxies[b].keys():
                x, y = proxies[a][gid].double().numpy(), proxies[b][gid].double().numpy()
                if len(x) > 1 and x.std() > 0 and y.std() > 0:
                    rhos.append(float(spearmanr(x, y).statistic))
            out[a][b] = sum(rhos) / len(rhos) if rhos else math.nan
    return out


def layer_ranking(a: Mapping[str, float], b: Mapping[str, float]) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Spearman and Kendall (with p-values) between two per-group sensitivities, and one row per shared group
    (sensitivities and ranks, 1 = most sensitive). The statistics are NaN when either side gives every group the
    same value (no ranking to correlate)."""
    from scipy.stats import kendalltau, spearmanr

    common = [g for g in a if g in b]
    if len(common) < 2:
        raise BadValue("the two model files share fewer than two channel groups: they cannot be compared")
    xa, xb = [a[g] for g in common], [b[g] for g in common]
    stats = dict.fromkeys(("spearman", "spearman_p", "kendall", "kendall_p"), math.nan)
    if len(set(xa)) > 1 and len(set(xb)) > 1:
        rho, tau = spearmanr(xa, xb), kendalltau(xa, xb)
        stats = {"spearman": float(rho.statistic), "spearman_p": float(rho.pvalue),
                 "kendall": float(tau.statistic), "kendall_p": float(tau.pvalue)}  # fmt: skip
    rank_a, rank_b = ranks(xa), ranks(xb)
    rows = [{"group": g, "sensitivity_a": xa[i], "sensitivity_b": xb[i], "rank_a": rank_a[i], "rank_b": rank_b[i]}
            for i, g in enumerate(common)]  # fmt: skip
    return stats, rows
