"""`dcs`: Discriminative Capability Score, from SINF (Sayyed, Ashdown, Restuccia, arXiv 2310.01259).

A channel matters if the classes can be told apart from it. For each channel group and a set of classes
(all classes for plain pruning; one semantic cluster inside SINF):

1. run the calibration images of those classes through the model and take the group's activation
   (N, C, H, W), adaptive-average-pooled to q x q (default q = 2) and flattened over channels to
   F in R^{N x C*q^2};
2. fit a linear discriminant W* on (F, y), features standardised first;
3. score channel c = sum of |W*| over the q^2 features of channel c and all outputs of W*,
   divided by the group's maximum (so 1.0 is the group's most discriminative channel). Higher = keep.

No code of the paper is public (see shared/reference/methods_dynamic.md, section 1); every open choice
is an option, recorded with the run:

- `activation`: which tensor is "the group's activation".
  `"input"` (default) is what the layers after the group read: the post-ReLU (and post-pool) feature
  map, taken at the input of the group's first consumer. Removing channel c removes exactly this
  tensor's channel c from the rest of the network, and information that the ReLU already discards
  (the negative part) cannot help any later layer, so it should not earn a channel its place.
  `"norm"` is the output of the group's BatchNorm (pre-activation; the producer's output when the
  group has none); `"producer"` is the raw conv/linear output.
- `probe`: `"lda"` (default) is scikit-learn's LinearDiscriminantAnalysis with Ledoit-Wolf shrinkage
  (robust when C*q^2 is large next to N), computed as scikit-learn does but solved by Cholesky (see
  `_lda`). With `lda_solver="lsqr"` (default) W* is `coef_`, the n_m linear discriminant functions
  Sigma_w^-1 mu_k (one row per class: the paper's W* in R^{C q^2 x n_m}); with `"eigen"` W* is the
  n_m - 1 leading Fisher directions (eigenvectors of S_w^-1 S_b), each weighted by the square root of
  its eigenvalue (the class separation along it).
  `"logistic"` is a multinomial logistic-regression probe (L2, C = `logistic_c`).
- Features are standardised (`standardize=True`) so that |W*| measures a channel's discriminative
  weight, not the inverse of its scale; a dead channel (constant activation) scores 0.
- A cluster with a single class has nothing to discriminate inside it: its channels are scored by how
  well they separate that class from all the others (one-vs-rest).

`dcs_scores` (all groups, any subset of classes) is the entry point SINF calls per cluster, through the registry
(`get_criterion("dcs")(options).scores`); `pooled_activations` + `channel_scores` split it, to capture activations
once and fit one discriminant per cluster.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prune_cli.api import ChannelGroup, Context, Criterion, Member, Scores, register_criterion
from prune_cli.errors import BadValue, PruneCliError

Activation = Literal["input", "norm", "producer"]


@dataclass(frozen=True)
class DCSOptions:
    """Defaults are the project's decisions (METHODS.md section 5)."""

    q: int = 2
    activation: Activation = "input"
    probe: Literal["lda", "logistic"] = "lda"
    lda_solver: Literal["lsqr", "eigen"] = "lsqr"
    shrinkage: str = "auto"  # "auto" (Ledoit-Wolf) or a float in [0, 1] written as text
    logistic_c: float = 1.0
    standardize: bool = True
    max_samples: int = 4096  # calibration images used (the first ones, so runs are deterministic)
    batch_size: int = 256

    def __post_init__(self):
        if self.q < 1:
            raise BadValue(f"dcs: q must be >= 1, got {self.q}")
        if self.activation not in ("input", "norm", "producer"):
            raise BadValue(f"dcs: activation must be input, norm or producer, not {self.activation!r}")
        if self.probe not in ("lda", "logistic"):
            raise BadValue(f"dcs: probe must be lda or logistic, not {self.probe!r}")
        if self.lda_solver not in ("lsqr", "eigen"):
            raise BadValue(f"dcs: lda_solver must be lsqr or eigen, not {self.lda_solver!r}")
        if self.shrinkage != "auto":
            try:
                value = float(self.shrinkage)
            except ValueError:
                raise BadValue(f"dcs: shrinkage must be 'auto' or a number in [0, 1], not {self.shrinkage!r}") from None
            if not 0.0 <= value <= 1.0:
                raise BadValue(f"dcs: shrinkage must be in [0, 1], got {value}")
        if not self.logistic_c > 0:
            raise BadValue(f"dcs: logistic_c must be positive, got {self.logistic_c}")
        if self.max_samples < 2 or self.batch_size < 1:
            raise BadValue("dcs: max_samples must be >= 2 and batch_size >= 1")


@register_criterion()
class DCS(Criterion):
    """Discriminative Capability Score: per channel, its weight in a linear discriminant of pooled activations."""

    name = "dcs"
    paper = "2310.01259"
    needs = frozenset({"data", "labels"})
    summary = "weight of each channel in a linear discriminant (LDA) of its pooled activations (SINF)"
    Options = DCSOptions

    def run(self, ctx: Context) -> Scores:
        calib = ctx.require_calib()
        ctx.log(f"dcs: pooled activations of {len(ctx.groups)} groups on {min(len(calib), self.options.max_samples)}"
                f" images, {self.options.probe} probe, q={self.options.q}")  # fmt: skip
        scores = dcs_scores(ctx.model, ctx.groups, calib.x, calib.y, options=self.options, device=ctx.device)
        return Scores(scores)

    def scores(
        self, model: nn.Module, groups: Sequence[ChannelGroup], x: Tensor, y: Tensor,
        classes: Iterable[int] | None = None, device: torch.device | str = "cpu",
    ) -> dict[str, Tensor]:  # fmt: skip
        """`dcs_scores` with this instance's options: {group id: (size,) in [0, 1]} for the class set `classes`
        (None = all) from images x (N, C, H, W) and labels y (N,). SINF scores each semantic cluster this way,
        reaching the criterion through the registry."""
        return dcs_scores(model, groups, x, y, classes=classes, options=self.options, device=device)


# ------------------------------------------------------------------------------------------ activations
def activation_site(group: ChannelGroup, activation: Activation) -> tuple[Member, bool]:
    """(member whose tensor is read, read its input rather than its output) for `activation`."""
    if activation == "input":
        if not group.consumers:
            raise PruneCliError(f"dcs: group {group.id!r} has no consumer to read its activation from")
        return group.consumers[0], True
    if activation == "norm" and group.norms:
        return group.norms[0], False
    if not group.producers:
        raise PruneCliError(f"dcs: group {group.id!r} has no producer to read its activation from")
    return group.producers[0], False


def _pool(t: Tensor, member: Member, size: int, q: int) -> Tensor:
    """The group's `size` channels of `t`, pooled: (N, size, q*q) (fewer features per channel for vectors)."""
    if t.dim() == 4:
        t = t[:, member.offset : member.offset + size]
        return F.adaptive_avg_pool2d(t.float(), q).flatten(2)
    if t.dim() == 2:
        expand = member.expand if member.kind == "linear_in" else 1
        n = t.shape[0]
        # channel c owns features offset + c*expand ... offset + (c+1)*expand - 1 (api.Member)
        t = t[:, member.offset : member.offset + size * expand].float().reshape(n, size, expand)
        if expand == 1:
            return t
        side = math.isqrt(expand)
        if side * side == expand:  # a flattened square feature map: pool it like one
            return F.adaptive_avg_pool2d(t.reshape(n, size, side, side), q).flatten(2)
        return F.adaptive_avg_pool1d(t, min(q * q, expand))
    raise PruneCliError(f"dcs: cannot pool a {t.dim()}-D activation at {member.module!r}")


@torch.no_grad()
def pooled_activations(
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    x: Tensor,
    *,
    q: int = 2,
    activation: Activation = "input",
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> dict[str, Tensor]:
    """Pooled activations of every group on images `x` (N, C, H, W): {group id: (N, size, r)} on the CPU.

    r = q*q for feature maps (fewer for vectors). One forward pass serves all groups; the pooling runs in
    the hooks, so memory is N * sum(size * r), not the full feature maps.
    """
    modules = dict(model.named_modules())
    sites: dict[tuple[str, bool], list[tuple[ChannelGroup, Member]]] = {}
    for g in groups:
        member, read_input = activation_site(g, activation)
        if member.module not in modules:
            raise PruneCliError(f"dcs: group {g.id!r} names module {member.module!r}, which the model lacks")
        sites.setdefault((member.module, read_input), []).append((g, member))
    captured: dict[str, list[Tensor]] = {g.id: [] for g in groups}

    def make_hook(entries: list[tuple[ChannelGroup, Member]], read_input: bool):
        def hook(_module, args, output=None):
            t = args[0] if read_input else output
            for g, member in entries:
                captured[g.id].append(_pool(t.detach(), member, g.size, q).cpu())

        return hook

    handles = []
    for (name, read_input), entries in sites.items():
        hook = make_hook(entries, read_input)
        if read_input:
            handles.append(modules[name].register_forward_pre_hook(hook))
        else:
            handles.append(modules[name].register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(x), batch_size):
            model(x[i : i + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {gid: torch.cat(parts) for gid, parts in captured.items()}


# -------------------------------------------------------------------------------------------- the probe
def channel_scores(
    features: Tensor, y: Tensor, classes: Iterable[int] | None = None, options: DCSOptions | None = None
) -> Tensor:
    """DCS of each channel from pooled activations `features` (N, C, r) and labels `y` (N,).

    `classes`: the class set to discriminate (None = every class in `y`). Samples of other classes are
    ignored, except for a single class, which is discriminated from all others (one-vs-rest).
    Returns (C,) float32 in [0, 1], normalised by the group's max; higher = keep.
    """
    options = options or DCSOptions()
    n, c, r = features.shape
    y = y.cpu()
    if classes is None:
        X, labels = features, y
    else:
        cls = torch.as_tensor(sorted(set(int(k) for k in classes)), dtype=y.dtype)
        inside = torch.isin(y, cls)
        if len(cls) == 1:
            X, labels = features, inside.long()
        else:
            X, labels = features[inside], y[inside]
    if labels.unique().numel() < 2:
        raise PruneCliError(
            f"dcs: needs images of at least two classes to discriminate, got classes {labels.unique().tolist()}"
            " (more calibration images?)"
        )
    X = X.reshape(len(X), c * r).double().numpy()
    labels = labels.numpy()
    std = X.std(axis=0)
    constant = std <= 1e-12 * max(1.0, float(np.abs(X).max(initial=0.0)))
    if options.standardize:
        X = (X - X.mean(axis=0)) / np.where(constant, 1.0, std)
    W = _fit(X, labels, options)  # (outputs, c * r)
    W[:, constant] = 0.0  # a constant feature carries no information; the solver leaves round-off there
    raw = np.abs(W).reshape(W.shape[0], c, r).sum(axis=(0, 2))
    raw = np.nan_to_num(raw, nan=0.0, posinf=0.0, neginf=0.0)
    top = raw.max()
    return torch.from_numpy(raw / top if top > 0 else raw).float()


def _fit(X: np.ndarray, y: np.ndarray, options: DCSOptions) -> np.ndarray:
    """W* as (outputs, features)."""
    if options.probe == "logistic":
        from sklearn.linear_model import LogisticRegression

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence chatter on separable data
            probe = LogisticRegression(C=options.logistic_c, max_iter=2000, tol=1e-6)
            return probe.fit(X, y).coef_
    return _lda(X, y, options.shrinkage, options.lda_solver)


def _lda(X: np.ndarray, y: np.ndarray, shrinkage: str, solver: str) -> np.ndarray:
    """Shrinkage LDA as scikit-learn's LinearDiscriminantAnalysis computes it, solved by Cholesky.

    The within-class covariance is scikit-learn's (prior-weighted per-class covariances; "auto" is
    Ledoit-Wolf on standardised data, a number is fixed shrinkage), so "lsqr" gives its `coef_`
    (Sigma^-1 mu_k, one row per class; tested). "eigen" gives the K-1 leading eigenvectors of
    S_w^-1 S_b with W^T S_w W = I, scaled by the square roots of their eigenvalues; S_b is the textbook
    between-class scatter (scikit-learn's eigen solver uses shrunk(S_total) - S_w, which differs
    slightly). scikit-learn solves these with an SVD least squares and a generalised eigensolver, 10-100x
    slower at the thousands of features of a 512-channel layer; the shrunk covariance is positive
    definite, so one Cholesky factor does both exactly.
    """
    from scipy import linalg
    from sklearn.covariance import empirical_covariance, ledoit_wolf, shrunk_covariance

    classes, yi = np.unique(y, return_inverse=True)
    priors = np.bincount(yi) / len(y)
    means = np.stack([X[yi == k].mean(axis=0) for k in range(len(classes))])
    sigma = np.zeros((X.shape[1], X.shape[1]))
    for k, p in enumerate(priors):
        Xk = X[yi == k]
        if shrinkage == "auto":  # Ledoit-Wolf on standardised data, scaled back
            scale = Xk.std(axis=0)
            scale[scale == 0] = 1.0
            cov = ledoit_wolf((Xk - Xk.mean(axis=0)) / scale, assume_centered=True)[0]
            cov = scale[:, None] * cov * scale[None, :]
        else:
            cov = shrunk_covariance(empirical_covariance(Xk), float(shrinkage))
        sigma += p * cov
    try:
        chol = linalg.cho_factor(sigma, lower=True)
    except linalg.LinAlgError:  # no shrinkage and a singular covariance: least squares instead
        chol = None
    if solver == "lsqr":
        if chol is None:
            return linalg.lstsq(sigma, means.T)[0].T
        return linalg.cho_solve(chol, means.T).T
    centred = (means - priors @ means) * np.sqrt(priors)[:, None]  # S_b = centred^T centred
    if chol is None:
        evals, evecs = linalg.eigh(centred.T @ centred, sigma)
        return evecs[:, np.argsort(evals)[::-1][: max(1, len(classes) - 1)]].T
    L = np.tril(chol[0])
    A = linalg.solve_triangular(L, centred.T, lower=True)  # L^-1 centred^T: (features, classes)
    U, sv, _ = np.linalg.svd(A, full_matrices=False)
    keep = max(1, len(classes) - 1)
    # Each direction weighted by its between-class spread (sqrt of its eigenvalue), so that a direction
    # that separates nothing (the rank of S_b is below K - 1 when class means are collinear) weighs nothing.
    return (linalg.solve_triangular(L.T, U[:, :keep], lower=False) * sv[:keep]).T


def dcs_scores(
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    x: Tensor,
    y: Tensor,
    classes: Iterable[int] | None = None,
    options: DCSOptions | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Tensor]:
    """DCS of every channel of `groups` for the class set `classes` (None = all), from images x (N, C, H, W)
    with labels y (N,). Uses at most `options.max_samples` of the images of those classes.

    Returns {group id: (size,) float32 in [0, 1]}; higher = keep.
    """
    options = options or DCSOptions()
    if classes is not None:
        cls = torch.as_tensor(sorted(set(int(k) for k in classes)), dtype=y.dtype)
        if len(cls) > 1:  # only the cluster's images are needed (one-vs-rest needs them all)
            inside = torch.isin(y.cpu(), cls)
            x, y = x[inside], y.cpu()[inside]
    x, y = x[: options.max_samples], y[: options.max_samples]
    feats = pooled_activations(
        model, groups, x, q=options.q, activation=options.activation, batch_size=options.batch_size, device=device
    )
    return {g.id: channel_scores(feats[g.id], y, classes, options) for g in groups}
