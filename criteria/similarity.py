"""`similarity`: channel-similarity clustering, after Zhang, Zhao, Ni, Zhang, Deng, "Exploiting Channel Similarity
for Accelerating Deep Convolutional Neural Networks" (arXiv 1908.02620).

No code of the paper is public; the spec is the project's reconstruction (shared/METHODS.md section 3,
shared/reference/methods_static.md section 3). Channels that carry the same information are redundant: cluster
each group's channels by a distance between their (post-BatchNorm, pre-ReLU) outputs y_i, keep one channel per
cluster and add the removed channels' input slices of the next layer(s) onto the kept one's.

Distances (`distance`), per producer p of the group, summed over producers (the squared distance between the
concatenated outputs of all producers; one producer outside scope `all`):
- `expected_sq` (default): model the conv's input patch as zero-mean isotropic, so that the normalised pre-BN
  responses have unit variance and correlation cos(w_i, w_j); then y_i ~ N(beta_i, gamma_i^2) and
  D_ij^2 = E[(y_i - y_j)^2] = (beta_i - beta_j)^2 + gamma_i^2 + gamma_j^2 - 2 gamma_i gamma_j cos(w_i, w_j)
  (signed gamma). A producer with no BatchNorm after it uses gamma_i = ||w_i||_2 and beta_i = its bias (the same
  model without normalisation: D^2 = (b_i - b_j)^2 + ||w_i - w_j||^2).
- `w2_bn`: the 2-Wasserstein distance of the two BN Gaussians, (beta_i - beta_j)^2 + (|gamma_i| - |gamma_j|)^2.
- `empirical`: E[(y_i - y_j)^2] measured on `empirical_images` calibration images, over images and positions
  (accumulated as a C x C second-moment matrix, so memory does not grow with the data). Only this distance needs
  data: the instance's `needs` is {"data"} then and empty otherwise (the class attribute stays empty, so
  `prune-cli list` shows "-").

Clustering: scipy average linkage (`linkage`) on D. Cluster counts (`allocation`):
- `uniform` (default): k = ceil((1 - r) C) clusters per group, with one ratio r for every group found by the shared
  selection's bisection on the cost model (so widths equal what `l1` with uniform selection would give).
- `threshold`: one global distance threshold tau, bisected on the cost model to meet the target; distances are
  divided per group by the mean second moment of its outputs (mean of beta^2 + gamma^2, or of E[y^2]), so one tau
  fits every layer. Widths then differ per layer.
Both never keep fewer than ceil((1 - max_ratio) C) channels. The dendrogram is cut into exactly k clusters
(the first C - k merges of the tree), so ties in merge heights cannot change a width.

Representative (`representative`): the channel with the largest |gamma| * ||w||_1 (`gamma_l1`, default; members
of a multi-producer group are divided by their mean and averaged, as in `l1`), or the cluster's medoid.

Merge (`merge`): `sum` (default) adds, in every consumer of the group (conv in-channels, linear in-features with
their flatten expansion), each removed channel's input slice onto its representative's; the result is returned
as weight overrides of the pruned consumers. This is exact when y_j == y_r (ReLU, pooling and flatten act per
channel). Depthwise consumers are not merged (a channel there has its own filter). `none` ablates the merge.
For residual groups (scope `all`) the merged quantity is the post-sum activation, so the merge is exact only when
the sums are equal; the distance still sums over every branch's BatchNorm.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy.cluster.hierarchy import linkage
from scipy.spatial.distance import squareform
from torch import Tensor, nn

from prune_cli.api import ChannelGroup, Context, Criterion, Plan, register_criterion
from prune_cli.api.graph import following_norms
from prune_cli.api.selection import bisect, kept_count, uniform_counts
from prune_cli.errors import BadValue


@dataclass(frozen=True)
class SimilarityOptions:
    """Defaults are the project's decisions (METHODS.md section 3)."""

    distance: Literal["expected_sq", "w2_bn", "empirical"] = "expected_sq"
    allocation: Literal["uniform", "threshold"] = "uniform"
    linkage: Literal["average", "complete", "single"] = "average"
    representative: Literal["gamma_l1", "medoid"] = "gamma_l1"
    merge: Literal["sum", "none"] = "sum"
    max_ratio: float = 0.9  # most of a group removed (the selection's default)
    empirical_images: int = 1024
    batch_size: int = 128

    def __post_init__(self):
        choices = {"distance": ("expected_sq", "w2_bn", "empirical"), "allocation": ("uniform", "threshold"),
                   "linkage": ("average", "complete", "single"), "representative": ("gamma_l1", "medoid"),
                   "merge": ("sum", "none")}  # fmt: skip
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise BadValue(f"similarity: {name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        if not 0 < self.max_ratio < 1:
            raise BadValue(f"similarity: max_ratio must be in (0, 1), got {self.max_ratio}")
        if self.empirical_images < 2 or self.batch_size < 1:
            raise BadValue("similarity: empirical_images must be >= 2 and batch_size >= 1")


@register_criterion()
class Similarity(Criterion):
    name = "similarity"
    paper = "1908.02620"
    needs = frozenset()  # {"data"} on the instance when distance=empirical (see __init__)
    summary = "cluster similar channels (BN-Gaussian distance), keep one per cluster, merge into the next layer"
    Options = SimilarityOptions

    def __init__(self, options: SimilarityOptions | None = None):
        super().__init__(options)
        if self.options.distance == "empirical":
            self.needs = frozenset({"data"})  # instance attribute: what make_context reads

    def run(self, ctx: Context) -> Plan:
        o = self.options
        follow = following_norms(ctx.model, ctx.example_input)
        groups = [g for g in ctx.groups if g.size > 1]
        dist = group_distances(ctx, groups, o.distance, follow, o.empirical_images, o.batch_size)
        trees = {gid: linkage(squareform(d, checks=False), method=o.linkage) for gid, (d, _) in dist.items()}
        if o.allocation == "uniform":
            counts = uniform_counts(ctx, o.max_ratio)
        else:
            counts = _threshold_counts(ctx, groups, trees, {gid: scale for gid, (_, scale) in dist.items()}, o)
        modules = dict(ctx.model.named_modules())
        keep: dict[str, Tensor] = {}
        merges: dict[str, list[tuple[int, list[int]]]] = {}
        report = ctx.progress("similarity clustering", len(groups))
        for g in groups:
            k = counts.get(g.id, g.size)
            report(1)
            if k >= g.size:
                continue
            strength = representative_strength(g, modules, follow)
            d = dist[g.id][0]
            kept, pairs = [], []
            for members in cut_clusters(trees[g.id], k):
                if o.representative == "medoid":
                    r = int(members[np.argmin(d[np.ix_(members, members)].sum(1))])
                else:  # largest |gamma| * ||w||_1; ties keep the lower index
                    r = int(members[np.argmax(strength[members])])
                kept.append(r)
                pairs.append((r, [int(j) for j in members if j != r]))
            keep[g.id] = torch.tensor(sorted(kept), dtype=torch.int64)
            merges[g.id] = pairs
        ctx.log(f"similarity: {len(keep)} groups clustered, distance {o.distance}, allocation {o.allocation}")
        overrides = merged_overrides(ctx, keep, merges) if o.merge == "sum" and keep else {}
        return Plan(keep, overrides)


# ---------------------------------------------------------------------------------------------- distances
def producer_stats(
    group: ChannelGroup, modules: Mapping[str, nn.Module], follow: Mapping[str, str]
) -> list[tuple[Tensor, Tensor, Tensor, bool]]:
    """Per producer of `group`: (gamma (C,), beta (C,), w (C, D), has_bn) in float64, as the distance model reads
    them. Without a BatchNorm after the producer, gamma = ||w||_2 and beta = the bias (or 0).
    """
    out = []
    for p in group.producers:
        sl = slice(p.offset, p.offset + group.size)
        layer = modules[p.module]
        w = layer.weight.detach().double().flatten(1)[sl]
        if p.module in follow:
            bn = modules[follow[p.module]]
            gamma = bn.weight.detach().double()[sl] if bn.weight is not None else torch.ones(group.size, dtype=w.dtype)
            beta = bn.bias.detach().double()[sl] if bn.bias is not None else torch.zeros(group.size, dtype=w.dtype)
        else:
            gamma = w.norm(dim=1)
            beta = layer.bias.detach().double()[sl] if layer.bias is not None else torch.zeros(group.size).double()
        out.append((gamma, beta, w, p.module in follow))
    return out


def expected_sq(gamma: Tensor, beta: Tensor, w: Tensor) -> Tensor:
    """D^2 (C, C) = (beta_i - beta_j)^2 + gamma_i^2 + gamma_j^2 - 2 gamma_i gamma_j cos(w_i, w_j)."""
    unit = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)  # a zero filter has cos 0 with everything
    cos = unit @ unit.T
    spread = gamma[:, None] ** 2 + gamma[None] ** 2 - 2 * torch.outer(gamma, gamma) * cos
    d2 = (beta[:, None] - beta[None]) ** 2 + spread
    return d2.clamp_min(0).fill_diagonal_(0)


def w2_bn(gamma: Tensor, beta: Tensor) -> Tensor:
    """D^2 (C, C) = (beta_i - beta_j)^2 + (|gamma_i| - |gamma_j|)^2 (2-Wasserstein between the BN Gaussians)."""
    a = gamma.abs()
    return ((beta[:, None] - beta[None]) ** 2 + (a[:, None] - a[None]) ** 2).fill_diagonal_(0)


def group_distances(
    ctx: Context, groups: list[ChannelGroup], distance: str, follow: Mapping[str, str], images: int = 1024,
    batch_size: int = 128,
) -> dict[str, tuple[np.ndarray, float]]:  # fmt: skip
    """{group id: (D (C, C) float64 distances, scale)}; scale = the mean second moment E[y^2] of the group's
    channels (used to normalise D for one global threshold)."""
    modules = dict(ctx.model.named_modules())
    if distance == "empirical":
        moments = empirical_moments(ctx, groups, follow, images, batch_size)
    out = {}
    for g in groups:
        if distance == "empirical":
            m = moments[g.id]
            diag = m.diagonal()
            d2 = (diag[:, None] + diag[None] - 2 * m).clamp_min(0).fill_diagonal_(0)
            scale = float(diag.mean())
        else:
            d2 = torch.zeros(g.size, g.size, dtype=torch.float64)
            scale = 0.0
            for gamma, beta, w, _ in producer_stats(g, modules, follow):
                d2 += expected_sq(gamma, beta, w) if distance == "expected_sq" else w2_bn(gamma, beta)
                scale += float((gamma**2 + beta**2).mean())
        d = d2.sqrt()
        d = (d + d.T) / 2  # exact symmetry for squareform
        out[g.id] = (d.numpy(), max(math.sqrt(max(scale, 0.0)), 1e-12))
    return out


@torch.no_grad()
def empirical_moments(
    ctx: Context, groups: list[ChannelGroup], follow: Mapping[str, str], images: int, batch_size: int
) -> dict[str, Tensor]:
    """{group id: sum over producers of E[y y^T] (C, C)}, y = the BN output (or the producer's output without BN)
    per image and position, on the first `images` calibration images."""
    sums: dict[tuple[str, str], Tensor] = {}
    counts: dict[tuple[str, str], int] = {}
    sites: dict[str, list[tuple[str, str, slice]]] = {}  # module whose output is y -> [(group, producer, slice)]
    for g in groups:
        for p in g.producers:
            site = follow.get(p.module, p.module)
            sites.setdefault(site, []).append((g.id, p.module, slice(p.offset, p.offset + g.size)))
            sums[g.id, p.module] = torch.zeros(g.size, g.size, dtype=torch.float64)
            counts[g.id, p.module] = 0
    for outputs in ctx.iter_module_outputs(list(sites), batch_size, images):
        for site, out in outputs.items():
            y = out.double()
            y = y.transpose(0, 1).reshape(y.shape[1], -1)  # (channels, images * positions)
            for gid, prod, sl in sites[site]:
                part = y[sl]
                sums[gid, prod] += (part @ part.T).cpu()
                counts[gid, prod] += part.shape[1]
    out = {}
    for g in groups:
        out[g.id] = sum(sums[g.id, p.module] / max(counts[g.id, p.module], 1) for p in g.producers)
    return out


# ---------------------------------------------------------------------------------------------- allocation
def _threshold_counts(
    ctx: Context, groups: list[ChannelGroup], trees: Mapping[str, np.ndarray], scales: Mapping[str, float],
    o: SimilarityOptions,
) -> dict[str, int]:  # fmt: skip
    """Cluster counts at the smallest global threshold tau (on per-group normalised distances) meeting the target."""
    cost = ctx.cost_model()
    base = cost.base(ctx.target.metric)
    heights = {gid: np.sort(z[:, 2] / scales[gid]) for gid, z in trees.items()}
    floor = {g.id: kept_count(g.size, o.max_ratio, 1, o.max_ratio) for g in groups}

    def counts_at(tau: float) -> dict[str, int]:
        # clusters left after every merge at height <= tau (what fcluster's "distance" criterion cuts)
        return {g.id: max(floor[g.id], g.size - int(np.searchsorted(heights[g.id], tau, side="right")))
                for g in groups}  # fmt: skip

    def reduction(tau: float) -> float:
        return 1 - cost.metric(counts_at(tau), ctx.target.metric) / base

    hi = max((float(h[-1]) for h in heights.values() if len(h)), default=0.0) + 1.0
    return bisect(reduction, ctx.target.reduction, hi, counts_at)


# ----------------------------------------------------------------------------------------- representatives
def cut_clusters(tree: np.ndarray, k: int) -> list[np.ndarray]:
    """The k clusters left after the first n - k merges of a scipy linkage `tree` (sorted member indices each).

    For a monotone linkage (average, complete, single) this is scipy's `cut_tree(tree, k)`, in O(n) merges
    instead of its O(n^2) Python walk.
    """
    n = len(tree) + 1
    clusters: dict[int, list[int]] = {i: [i] for i in range(n)}
    for t in range(n - k):
        a, b = int(tree[t, 0]), int(tree[t, 1])
        clusters[n + t] = clusters.pop(a) + clusters.pop(b)
    return sorted((np.sort(np.asarray(c)) for c in clusters.values()), key=lambda c: int(c[0]))


def representative_strength(
    group: ChannelGroup, modules: Mapping[str, nn.Module], follow: Mapping[str, str]
) -> np.ndarray:
    """|gamma| * ||w||_1 per channel (C,); several producers: each divided by its mean, then averaged."""
    parts = []
    for gamma, _beta, w, has_bn in producer_stats(group, modules, follow):
        s = w.abs().sum(1) * (gamma.abs() if has_bn else 1.0)
        parts.append(s / s.mean().clamp_min(1e-12))
    return torch.stack(parts).mean(0).numpy()


@torch.no_grad()
def merged_overrides(
    ctx: Context, keep: Mapping[str, Tensor], merges: Mapping[str, list[tuple[int, list[int]]]]
) -> dict[str, Tensor]:
    """Consumer weights of the pruned model after adding each removed channel's in-slice onto its representative's.

    The merge is done on a full-size copy of the model, which is then pruned with the same plan, so the consumers'
    own out-channel pruning (another group of the plan) is applied exactly as surgery applies it.
    """
    merged = copy.deepcopy(ctx.model)
    modules = dict(merged.named_modules())
    touched = set()
    by_id = {g.id: g for g in ctx.groups}
    for gid, pairs in merges.items():
        g = by_id[gid]
        for c in g.consumers:
            if c.kind not in ("conv_in", "linear_in"):
                continue  # depthwise: each channel has its own filter, nothing to add onto
            w = modules[c.module].weight
            if c.kind == "conv_in" and modules[c.module].groups != 1:
                continue
            touched.add(c.module)
            for r, removed in pairs:
                dst = slice(c.offset + r * c.expand, c.offset + (r + 1) * c.expand)
                for j in removed:
                    w[:, dst] += w[:, c.offset + j * c.expand : c.offset + (j + 1) * c.expand]
    pruned = ctx.prune(keep, model=merged)
    return {f"{name}.weight": pruned.get_submodule(name).weight.detach().clone() for name in sorted(touched)}
