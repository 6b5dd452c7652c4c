"""SINF: semantic inference with per-cluster subgraphs (Sayyed, Ashdown, Restuccia, arXiv 2310.01259).

One trained model becomes a shared extractor, a route predictor and one pruned subgraph per semantic
cluster of classes. Nothing is retrained except the small router; the base weights are reused as they are.

Representation ("extractor + subgraph"). The base model is traced once with torch.fx and split at one
node, the attachment point: `extractor` is the graph from the image to that node, `tail` the graph from
that node to the logits. Only nodes that cut the graph in two are allowed (nothing computed before the
node is read after it: in a ResNet, block outputs; in a VGG, every ReLU / pool output), so
`tail(extractor(x)) == model(x)` exactly. A cluster's subgraph is the tail of a physically pruned copy
of the whole model (`surgery.prune`) in which only channel groups lying entirely after the attachment
point lose channels; its extractor part is therefore identical to the base's and is shared, not stored.
Both halves are `fx.GraphModule`s that keep the original module names, so a subgraph's weights are saved
and reloaded by those names.

Pipeline (`build`), with the project's decisions (METHODS.md section 6; shared/reference/methods_dynamic.md):
1. Clusters: CIFAR-100's 20 superclasses when the data carry coarse labels; otherwise (our extension)
   agglomerative (Ward) clustering of the L2-normalised class means of the penultimate features (the
   input of the last Linear) into K clusters.
2. Router GAP + Linear(C, 64) + ReLU + Linear(64, K), trained on training images with the base frozen at
   each candidate node in order; it is attached at the earliest whose validation cluster accuracy reaches
   `threshold` (0.75), or at the best one, with a warning, when none does.
3. For each cluster m, DCS (criteria/dcs.py) on the cluster's training images scores every channel group
   after the attachment point; the removed fraction goes linearly from r_M (first group after it) to r_L
   (last), top channels kept per group. No weight is trained; by default (`bn_recalibration`) each
   subgraph's BatchNorm statistics are re-estimated on its cluster's training images (forward passes
   only), without which accuracy collapses once a few tens of percent of channels are gone.
4. Inference: extractor, router; if the router's softmax confidence >= gamma the cluster's subgraph runs,
   else the base tail (the full model). The output is the base classifier head; with `restrict` (default)
   a routed input's logits outside its cluster's classes are -inf. A subgraph pruned to tell its
   cluster's classes apart gives unreliable logits for the others: on fashion-mnist (ResNet-20, K = 5)
   SINF's top-1 is 0.761 restricted and 0.599 unrestricted at the same routing (gamma 0).

Files (`save` / `load`, no pickle): `sinf.json` (manifest: attachment node, clusters, widths of every
subgraph, options, provenance), `base.safetensors` (the base model file), `router.safetensors`,
`subgraphs.safetensors` (tail weights, keys "m/<parameter name>") and `scores.safetensors` (the DCS
scores, keys "m/<group id>", so a sweep re-prunes without data for scoring).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from prune_cli.api import ChannelGroup, get_criterion
from prune_cli.data import splits as D
from prune_cli.engine import recalibrate_batchnorm
from prune_cli.errors import BadModelFile, BadValue, PruneCliError, UnsupportedGraph
from prune_cli.store.files import atomic_write, write_text
from prune_cli.surgery.split import Candidate, attach_candidates, gap_features, node_index, split, trace

FORMAT = "prune-cli-sinf/1"
Log = Callable[[str], None]


@dataclass(frozen=True)
class SinfConfig:
    """Options of `sinf build`; defaults are the project's decisions."""

    r_M: float = 0.1  # removed fraction of the first group after the attachment point
    r_L: float = 0.6  # removed fraction of the last group
    clusters: int = 5  # K for agglomerative clustering (ignored when the data have superclasses)
    use_superclasses: bool = True
    threshold: float = 0.75  # validation cluster accuracy the router must reach
    gamma: float = 0.0  # router confidence below which the full model runs
    restrict: bool = True
    bn_recalibration: bool = True  # re-estimate each subgraph's BatchNorm statistics on its cluster's images
    router_hidden: int = 64
    router_epochs: int = 30
    router_images: int = 20000  # training images used to fit the router
    dcs_images_per_class: int = 256
    scope: str = "internal"
    dcs: Any = field(default_factory=lambda: get_criterion("dcs").Options())  # the dcs criterion's Options
    seed: int = 0

    def __post_init__(self):
        for name in ("r_M", "r_L"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise BadValue(f"{name} is a removed fraction in [0, 1), got {getattr(self, name)}")
        if not 0.0 < self.threshold <= 1.0 or not 0.0 <= self.gamma <= 1.0:
            raise BadValue(f"threshold must be in (0, 1] and gamma in [0, 1] (got {self.threshold}, {self.gamma})")
        if self.clusters < 2:
            raise BadValue(f"--clusters must be >= 2, got {self.clusters}")
        if self.scope not in ("internal", "all"):
            raise BadValue(f"scope must be internal or all, not {self.scope!r}")
        if min(self.router_hidden, self.router_epochs, self.router_images, self.dcs_images_per_class) < 1:
            raise BadValue("router and DCS sizes must be positive")


# ------------------------------------------------------------------------------------------------ router
class Router(nn.Module):
    """GAP + Linear(C, hidden) + ReLU + Linear(hidden, K): feature map (N, C, H, W) -> cluster logits (N, K)."""

    def __init__(self, channels: int, clusters: int, hidden: int = 64):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, clusters)

    def forward(self, h: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(self.pool(h).flatten(1))))


def train_router(
    f_train: Tensor, z_train: Tensor, f_val: Tensor, z_val: Tensor, clusters: int, hidden: int, epochs: int, seed: int
) -> tuple[Router, float]:
    """Fit a router on GAP features (N, C) and cluster labels; return it and its validation accuracy.

    The router's first step is the GAP, so it is trained on the pooled features directly. Features are
    standardised for the optimiser and the standardisation is folded into fc1 afterwards (exact), so the
    saved router has the fixed GAP + MLP shape.
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mean, std = f_train.mean(0), f_train.std(0).clamp_min(1e-6)
    router = Router(f_train.shape[1], clusters, hidden)
    opt = torch.optim.AdamW(router.parameters(), lr=3e-3, weight_decay=1e-4)
    batch = 512
    steps = epochs * max(1, math.ceil(len(f_train) / batch))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    xs = (f_train - mean) / std
    router.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xs), generator=g)
        for i in range(0, len(xs), batch):
            idx = perm[i : i + batch]
            loss = F.cross_entropy(router.fc2(F.relu(router.fc1(xs[idx]))), z_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        router.fc1.bias -= router.fc1.weight @ (mean / std)
        router.fc1.weight /= std
    router.eval()
    with torch.no_grad():
        acc = float((router.fc2(F.relu(router.fc1(f_val))).argmax(1) == z_val).float().mean()) if len(f_val) else 0.0
    return router, acc


def attach_router(
    candidates: Sequence[Candidate], fit: Callable[[Candidate], tuple[Router, float]], threshold: float
) -> tuple[Candidate, Router, float, list[dict[str, Any]]]:
    """The paper's rule: the earliest candidate (graph order) whose router reaches `threshold` validation cluster
    accuracy, or, when none does, the most accurate one (the earliest of equals).

    `fit(candidate) -> (router, val cluster accuracy)` trains one router; candidates after the chosen one are not
    trained. Returns the candidate, its router and accuracy, and one record per candidate tried.
    """
    tried: list[dict[str, Any]] = []
    best: tuple[Candidate, Router, float] | None = None
    for c in candidates:
        router, acc = fit(c)
        tried.append({"node": c.node, "label": c.label, "channels": c.channels, "val_cluster_acc": acc})
        if acc >= threshold:
            return c, router, acc, tried
        if best is None or acc > best[2]:
            best = (c, router, acc)
    if best is None:
        raise UnsupportedGraph("SINF found no node to attach a router at (no ReLU or pooling that cuts the graph)")
    return (*best, tried)


# ---------------------------------------------------------------------------------------------- clusters
def penultimate_features(model: nn.Module, x: Tensor, batch_size: int = 256) -> Tensor:
    """Input of the model's last Linear layer (the classifier's features), (N, F)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise PruneCliError("clustering classes needs a final nn.Linear classifier to read features from")
    parts: list[Tensor] = []
    handle = linears[-1].register_forward_pre_hook(lambda _m, args: parts.append(args[0].detach().float().cpu()))
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                model(x[i : i + batch_size].to(device))
    finally:
        handle.remove()
    return torch.cat(parts).flatten(1)


def feature_clusters(features: Tensor, y: Tensor, num_classes: int, k: int) -> list[list[int]]:
    """Ward clustering of the L2-normalised class means of `features` (N, F) into k clusters of classes."""
    from sklearn.cluster import AgglomerativeClustering

    if k > num_classes:
        raise BadValue(f"--clusters {k} is more than the {num_classes} classes")
    means = torch.stack([features[y == c].mean(0) if (y == c).any() else features.mean(0) for c in range(num_classes)])
    means = F.normalize(means, dim=1).double().numpy()
    labels = AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(means)
    return _canonical([[c for c in range(num_classes) if labels[c] == j] for j in range(k)])


def _canonical(clusters: list[list[int]]) -> list[list[int]]:
    return sorted((sorted(c) for c in clusters if c), key=lambda c: c[0])


def superclass_clusters(split: D.Split, num_classes: int) -> list[list[int]] | None:
    """Fine classes grouped by the split's coarse labels, or None when it has none."""
    coarse = getattr(split, "coarse", None)
    if coarse is None:
        return None
    groups: dict[int, set[int]] = {}
    for fine, c in zip(split.y.tolist(), coarse.tolist(), strict=True):
        groups.setdefault(int(c), set()).add(int(fine))
    clusters = _canonical([list(v) for _, v in sorted(groups.items())])
    if sorted(c for cl in clusters for c in cl) != list(range(num_classes)):
        raise PruneCliError("the dataset's superclasses do not partition its classes")
    return clusters


# ------------------------------------------------------------------------------------------- subgraphs
def tail_groups(gm: fx.GraphModule, groups: Sequence[ChannelGroup], cut: str, scope: str) -> list[ChannelGroup]:
    """Prunable groups whose every layer runs after node `cut`, in graph order (first producer)."""
    where = node_index(gm)
    at = [n.name for n in gm.graph.nodes].index(cut)
    chosen = []
    from prune_cli.selection.plan import groups_in_scope

    for g in groups_in_scope(list(groups), scope):
        positions = [where[m.module] for m in g.members if m.module in where]
        if positions and min(positions) > at:
            chosen.append((min(where[m.module] for m in g.producers if m.module in where), g))
    return [g for _, g in sorted(chosen, key=lambda t: t[0])]


def removal_fractions(n: int, r_M: float, r_L: float) -> list[float]:
    """Removed fraction per layer, linear from r_M (first) to r_L (last)."""
    if n == 1:
        return [r_M]
    return [r_M + (r_L - r_M) * i / (n - 1) for i in range(n)]


def keep_plan(groups: Sequence[ChannelGroup], scores: dict[str, Tensor], r_M: float, r_L: float) -> dict[str, Tensor]:
    """Per group the sorted indices of its top channels by score, keeping round(size * (1 - r)) >= 1."""
    plan = {}
    for g, r in zip(groups, removal_fractions(len(groups), r_M, r_L), strict=True):
        k = max(1, round(g.size * (1.0 - r)))
        order = torch.sort(scores[g.id], descending=True, stable=True).indices
        plan[g.id] = order[:k].sort().values.long()
    return plan


class SinfModel(nn.Module):
    """Extractor, router, one subgraph per cluster, and the base tail for low-confidence inputs.

    forward(x (N, C, H, W)) -> logits (N, classes). `last_route` keeps the last batch's clusters (N,),
    with -1 for inputs sent to the full model.
    """

    def __init__(
        self,
        extractor: nn.Module,
        router: Router,
        subgraphs: Sequence[nn.Module],
        full_tail: nn.Module,
        clusters: Sequence[Sequence[int]],
        num_classes: int,
        gamma: float = 0.0,
        restrict: bool = True,
    ):
        super().__init__()
        self.extractor, self.router, self.full_tail = extractor, router, full_tail
        self.subgraphs = nn.ModuleList(subgraphs)
        self.clusters = [list(c) for c in clusters]
        self.num_classes, self.gamma, self.restrict = num_classes, gamma, restrict
        allowed = torch.zeros(len(clusters), num_classes, dtype=torch.bool)
        for m, cl in enumerate(self.clusters):
            allowed[m, cl] = True
        self.register_buffer("allowed", allowed, persistent=False)
        self.last_route: Tensor | None = None

    def route(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """(cluster (N,), confidence (N,)) from extractor output h."""
        conf, cluster = F.softmax(self.router(h).float(), dim=1).max(1)
        return cluster, conf

    def forward(self, x: Tensor) -> Tensor:
        h = self.extractor(x)
        return self.run_tails(h, *self.route(h))

    def run_tails(self, h: Tensor, cluster: Tensor, conf: Tensor) -> Tensor:
        """Logits (N, classes) from extractor output h and the router's decision for each input."""
        cluster = torch.where(conf >= self.gamma, cluster, torch.full_like(cluster, -1))
        self.last_route = cluster
        out: Tensor | None = None
        for m in cluster.unique().tolist():
            rows = (cluster == m).nonzero().squeeze(1)
            part = (self.full_tail if m < 0 else self.subgraphs[m])(h.index_select(0, rows))
            if self.restrict and m >= 0:
                part = part.masked_fill(~self.allowed[m], float("-inf"))
            if out is None:
                out = part.new_empty(len(h), part.shape[1])
            out[rows] = part
        assert out is not None
        return out


@dataclass
class Sinf:
    """A built SINF model with what is needed to save, evaluate and re-prune it."""

    model: SinfModel
    base: nn.Module
    cut: str
    groups: list[ChannelGroup]
    scores: list[dict[str, Tensor]]  # per cluster, per group id
    widths: list[dict[str, Any]]  # per cluster: modelfile.module_widths of the pruned copy
    manifest: dict[str, Any]


ImagesOf = Callable[[int], Tensor]  # cluster -> its normalised training images (N, C, H, W), for BN statistics


def make_subgraphs(
    base: nn.Module,
    example_input: Tensor,
    cut: str,
    groups: Sequence[ChannelGroup],
    scores: Sequence[dict[str, Tensor]],
    r_M: float,
    r_L: float,
    bn_images: ImagesOf | None = None,
) -> tuple[list[nn.Module], list[dict[str, Any]]]:
    """One pruned tail per cluster (and the module widths of each pruned copy).

    With `bn_images`, the BatchNorm statistics of each tail are re-estimated on its cluster's images.
    """
    from prune_cli.store.modelfile import module_widths
    from prune_cli.surgery import prune

    extractor = split(trace(base), cut)[0] if bn_images is not None else None
    tails, widths = [], []
    for m, s in enumerate(scores):
        pruned = prune(base, example_input, keep_plan(groups, s, r_M, r_L))
        pruned.eval()
        tail = split(trace(pruned), cut)[1]
        if extractor is not None and bn_images is not None:
            x = bn_images(m)
            recalibrate_batchnorm(tail.eval(), x, images=len(x), batch_size=128, features=extractor)
        tails.append(tail)
        widths.append(module_widths(pruned))
    return tails, widths


def images(split_: D.Split, splits: D.Splits, index: Tensor | None = None) -> Tensor:
    """Normalised float images of a split (or of `index` into it), on the CPU."""
    x = split_.x if index is None else split_.x[index]
    return D.to_float(x, splits)


def cluster_images(y: Tensor, classes: Sequence[int], per_class: int, others: bool = False) -> Tensor:
    """Indices of up to `per_class` images of each class (the first ones); with `others`, as many of the rest."""
    picked = [(y == c).nonzero().squeeze(1)[:per_class] for c in classes]
    idx = torch.cat(picked)
    if others:
        rest = (~torch.isin(y, torch.as_tensor(list(classes)))).nonzero().squeeze(1)
        idx = torch.cat([idx, rest[: len(idx)]])
    return idx.sort().values


def cluster_image_source(splits: D.Splits, clusters: Sequence[Sequence[int]], per_class: int) -> ImagesOf:
    """Cluster -> up to `per_class` training images of each of its classes (the images DCS scores on)."""
    return lambda m: images(splits.train, splits, cluster_images(splits.train.y, clusters[m], per_class))


def build(
    base: nn.Module, splits: D.Splits, cfg: SinfConfig, *, device: torch.device | None = None, log: Log = print
) -> Sinf:
    """Clusters, router and attachment point, DCS per cluster, and the pruned subgraphs."""
    from prune_cli.surgery import channel_groups

    t0 = time.perf_counter()
    device = device or next(base.parameters()).device
    base = base.to(device).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    example = images(splits.train, splits, torch.arange(1)).to(device)
    gm = trace(base, "SINF")
    num_classes = splits.num_classes

    # 1. clusters
    clusters = superclass_clusters(splits.train, num_classes) if cfg.use_superclasses else None
    source = "superclasses"
    if clusters is None:
        idx = cluster_images(splits.train.y, range(num_classes), cfg.dcs_images_per_class)
        feats = penultimate_features(base, images(splits.train, splits, idx))
        clusters = feature_clusters(feats, splits.train.y[idx], num_classes, cfg.clusters)
        source = "agglomerative (Ward, class-mean penultimate features; our extension)"
    k = len(clusters)
    cluster_of = torch.empty(num_classes, dtype=torch.long)
    for m, cl in enumerate(clusters):
        cluster_of[cl] = m
    log(f"sinf: {k} clusters from {source}: {clusters}")

    # 2. router and attachment point
    candidates = attach_candidates(gm, example)
    if not candidates:
        raise UnsupportedGraph("SINF found no node to attach a router at (no ReLU or pooling that cuts the graph)")
    n_train = min(cfg.router_images, len(splits.train))
    x_train = images(splits.train, splits, torch.arange(n_train))
    x_val = images(splits.val, splits)
    names = [c.node for c in candidates]
    f_train, f_val = gap_features(gm, names, x_train), gap_features(gm, names, x_val)
    z_train, z_val = cluster_of[splits.train.y[:n_train]], cluster_of[splits.val.y]

    def fit(c: Candidate) -> tuple[Router, float]:
        router, acc = train_router(
            f_train[c.node], z_train, f_val[c.node], z_val, k, cfg.router_hidden, cfg.router_epochs, cfg.seed
        )
        log(f"sinf: router at {c.label} ({c.channels} channels, {c.hw[0]}x{c.hw[1]}): val cluster accuracy {acc:.4f}")
        return router, acc

    cand, router, router_acc, tried = attach_router(candidates, fit, cfg.threshold)
    if router_acc < cfg.threshold:
        log(f"sinf: warning: no attachment point reached {cfg.threshold:.0%}; using the best, {cand.label}")
    router = router.to(device)

    # 3. DCS per cluster on the groups after the attachment point
    groups = tail_groups(gm, channel_groups(base, example), cand.node, cfg.scope)
    if not groups:
        raise PruneCliError(f"no prunable channel group lies after the attachment point {cand.label}")
    y_all = splits.train.y
    scores, dcs = [], get_criterion("dcs")(cfg.dcs)  # through the registry: SINF uses DCS as any criterion is used
    for m, cl in enumerate(clusters):
        idx = cluster_images(y_all, cl, cfg.dcs_images_per_class, others=len(cl) == 1)
        x_m = images(splits.train, splits, idx)
        scores.append(dcs.scores(base, groups, x_m, y_all[idx], classes=cl, device=device))
        log(f"sinf: DCS for cluster {m} ({len(cl)} classes, {len(idx)} images)")

    # 4. subgraphs
    bn_images = cluster_image_source(splits, clusters, cfg.dcs_images_per_class) if cfg.bn_recalibration else None
    tails, widths = make_subgraphs(base, example, cand.node, groups, scores, cfg.r_M, cfg.r_L, bn_images)
    extractor, full_tail = split(gm, cand.node)
    model = SinfModel(extractor, router, tails, full_tail, clusters, num_classes, cfg.gamma, cfg.restrict)
    manifest = {
        "format": FORMAT,
        "cut": cand.node,
        "cut_label": cand.label,
        "cut_channels": cand.channels,
        "clusters": clusters,
        "cluster_source": source,
        "num_classes": num_classes,
        "input_shape": list(example.shape[1:]),
        "router": {"hidden": cfg.router_hidden, "val_cluster_acc": router_acc, "candidates": tried},
        "groups": [g.id for g in groups],
        "removed_fractions": removal_fractions(len(groups), cfg.r_M, cfg.r_L),
        "config": {**asdict(cfg), "dcs": asdict(cfg.dcs)},
        "build_seconds": time.perf_counter() - t0,
    }
    return Sinf(model.to(device).eval(), base, cand.node, groups, scores, widths, manifest)


def reprune(s: Sinf, r_M: float, r_L: float, example_input: Tensor, bn_images: ImagesOf | None = None) -> SinfModel:
    """The same SINF model with other removal fractions, from the stored scores (no re-scoring).

    `bn_images` is needed when the model was built with BatchNorm re-estimation (`cluster_image_source`).
    """
    tails, _ = make_subgraphs(s.base, example_input, s.cut, s.groups, s.scores, r_M, r_L, bn_images)
    m = s.model
    return SinfModel(m.extractor, m.router, tails, m.full_tail, m.clusters, m.num_classes, m.gamma, m.restrict)


# -------------------------------------------------------------------------------------------- save/load
def save(s: Sinf, out_dir: str | Path, **info: Any) -> Path:
    """Write the file set (see the module docstring) to `out_dir`. `info` is stored in the manifest."""
    from prune_cli.store.modelfile import save_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_model(s.base, out / "base.safetensors", **getattr(s.base, "prune_cli_info", {}))
    _save_tensors(out / "router.safetensors", s.model.router.state_dict())
    subgraphs = {f"{m}/{k}": v for m, sg in enumerate(s.model.subgraphs) for k, v in sg.state_dict().items()}
    _save_tensors(out / "subgraphs.safetensors", subgraphs)
    scores = {f"{m}/{gid}": v for m, per in enumerate(s.scores) for gid, v in per.items()}
    _save_tensors(out / "scores.safetensors", scores)
    manifest = {**s.manifest, "widths": s.widths, "info": info}
    write_text(out / "sinf.json", json.dumps(manifest, indent=1, default=str))
    return out


def _save_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    with atomic_write(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))


def load(path: str | Path, device: torch.device | str = "cpu", *, trust: Collection[str] = ()) -> Sinf:
    """Rebuild a saved SINF model: base from its model file, subgraphs from their widths and weights. `trust`: user
    factories the base model file may name (see `modelfile.load_model`)."""
    from prune_cli.store.modelfile import build_architecture, load_model, read_metadata

    path = Path(path)
    manifest_path = path / "sinf.json"
    if not manifest_path.is_file():
        raise BadModelFile(f"{path} is not a SINF folder (no sinf.json; make one with `prune-cli sinf build`)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise BadModelFile(f"{manifest_path} is not valid JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BadModelFile(f"{manifest_path} is not a {FORMAT} manifest")
    # The tensor files first: a corrupt one is named as such, before any model is built from the manifest.
    tensors = {}
    for name in ("subgraphs", "router", "scores"):
        file = path / f"{name}.safetensors"
        try:
            tensors[name] = load_file(str(file), device=str(device) if name != "scores" else "cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise BadModelFile(f"{file} is not a readable .safetensors file ({exc})") from None
    try:
        base = load_model(path / "base.safetensors", device, trust=trust)
        arch, _ = read_metadata(path / "base.safetensors")
        cut, clusters = manifest["cut"], manifest["clusters"]
        extractor, full_tail = split(trace(base), cut)
        weights = tensors["subgraphs"]
        tails = []
        for m, widths in enumerate(manifest["widths"]):
            pruned = build_architecture({**arch, "widths": widths}, trust=trust, source=path)
            tail = split(trace(pruned), cut)[1]
            prefix = f"{m}/"
            tail.load_state_dict({k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)})
            tails.append(tail.to(device).eval())
        router = Router(manifest["cut_channels"], len(clusters), manifest["router"]["hidden"])
        router.load_state_dict(tensors["router"])
        raw = tensors["scores"]
        cfg = manifest["config"]
        scores = [{gid: raw[f"{m}/{gid}"] for gid in manifest["groups"]} for m in range(len(clusters))]
        model = SinfModel(
            extractor, router.to(device).eval(), tails, full_tail, clusters, manifest["num_classes"],
            cfg["gamma"], cfg["restrict"],
        )  # fmt: skip
        from prune_cli.surgery import channel_groups

        example = torch.zeros(1, *_input_shape(manifest), device=device)
        by_id = {g.id: g for g in channel_groups(base, example)}
        groups = [by_id[gid] for gid in manifest["groups"]]
    # A manifest edited by hand can hold any JSON where a list, a number or a name is expected.
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError, OSError) as exc:
        raise BadModelFile(f"{path}: the SINF files do not fit together ({type(exc).__name__}: {exc})") from None
    return Sinf(model.to(device).eval(), base, cut, groups, scores, manifest["widths"], manifest)


def _input_shape(manifest: dict) -> tuple[int, ...]:
    shape = manifest.get("input_shape")
    if shape is None:
        raise BadModelFile("sinf.json lacks the input shape")
    return tuple(shape)
