"""`lasso`: LASSO channel selection and least-squares reconstruction, after He, Zhang, Sun, "Channel Pruning for
Accelerating Very Deep Neural Networks", ICCV 2017 (arXiv 1707.06168); details from the official code
(shared/reference/methods_static.md section 4, METHODS.md section 4).

Groups are processed shallow to deep. For a group with c channels, to keep c' (one uniform ratio for every group,
found by the shared selection's bisection on the cost model so that the plan meets the target):

1. Sampling: `images` calibration images (default 5000, or all if fewer; a seeded random subset otherwise) x
   `points` random output positions of each consumer C of the group (same positions for X and Y). Y (S, n) is C's
   output minus its bias in the ORIGINAL model; X (S, c, kh*kw) are C's zero-padded input patches in the CURRENT
   model, i.e. with the earlier groups already pruned and their consumers refit (so errors do not accumulate).
2. LASSO: with Z_i = X_i W_i^T (S, n) the contribution of channel i, minimise
   (1/2M) ||vec(Y) - sum_i beta_i vec(Z_i)||^2 + lambda ||beta||_1 over `lasso_rows` (400) sampled rows, M = rows*n,
   with an intercept, as scikit-learn `Lasso` (the code's solver). The design matrix would be (400 n) x c (800 MB
   for a 512-wide layer), so the same problem is handed to `Lasso` in an exactly equivalent c x c form: centre
   the columns, factor the Gram matrix as R^T R (eigendecomposition) and take q with R^T q = A^T y, then
   ||y - A beta||^2 = ||q - R beta||^2 + const, and lambda is rescaled by M / c for the smaller row count.
   lambda starts at `alpha` (1e-3), doubles until nnz(beta) < c', then is bisected until
   c' <= nnz <= c' (1 + rank_tol); the channels with the smallest |beta| are dropped to keep exactly c'.
3. Refit: least squares (torch.linalg.lstsq, float64, all S samples) of C on the kept channels, with a bias:
   the new bias is added to C's bias; a conv without bias that feeds a BatchNorm gets it through that BatchNorm's
   running mean (mean -= b, exact in eval mode); otherwise the fit has no intercept. beta is not folded in.
4. The group is pruned in the current model with the refit weights, and the next group is processed.

The Plan's overrides are the final weights (and bias / BN running mean) of every refit consumer, read from the
sequentially pruned model, so `ctx.prune(keep, overrides)` rebuilds exactly that model.

Consumers: convs (groups=1, zero padding, the group covering the whole input dim) and Linears (a channel owns its
`expand` input features after a flatten, one sample per image) are handled the same way; a group read by several
consumers (scope `all`: residual groups; a shortcut and a block) solves one LASSO over all consumers' stacked
outputs and refits each consumer. This is how VGG's last conv group (read by the classifier's Linear after the
pool) and the hidden Linear group are treated. A group with any other consumer (depthwise, grouped, part of a
concatenation) falls back to keeping the largest-L1 producer filters without refit (logged).
ResNets: scope `internal` (default) prunes only the channels inside a block (the code's branch2a/2b). With
`refit=residual` (default; the paper's multi-branch case, section 3.3), a consumer whose BatchNorm'd output is
added to a shortcut (a block's last conv) is fitted to Y + (S_orig - S_cur) / a: S the shortcut's value in the
original and the current model, a the BatchNorm's scale, so that the refit block's sum matches the original sum and
the errors of earlier blocks, which the shortcut carries, are absorbed instead of accumulating. Which modules meet
a shortcut is found from one recorded forward pass (the other operand of the addition that reads their output), so
projection and identity shortcuts take one code path. The code's channel sampler is not built.

Memory: X is float32 (S x c x kh*kw), the refit float64; with 1024 calibration images and a 512-channel 3x3
consumer that is 10240 x 4608 values (190 MB, 380 MB in float64).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from prune_cli.api import ChannelGroup, Context, Criterion, Member, Plan, register_criterion
from prune_cli.api.graph import following_norms
from prune_cli.api.selection import uniform_counts
from prune_cli.errors import BadValue


@dataclass(frozen=True)
class LassoOptions:
    """Defaults are the project's decisions and the official code's settings (METHODS.md section 4)."""

    images: int = 5000  # calibration images sampled (all of them when fewer)
    points: int = 10  # random output positions per image and conv consumer
    lasso_rows: int = 400  # sampled rows for the LASSO (the code's N')
    alpha: float = 1e-3  # first lambda
    rank_tol: float = 0.1  # stop bisecting once c' <= nnz <= c' (1 + rank_tol)
    # least-squares reconstruction of the consumers: `layer` to each consumer's original output; `residual` the same,
    # but a consumer whose (BatchNorm'd) output is added to a shortcut is fitted to the original sum, absorbing the
    # shortcut's drift (the paper's branch2c; best of the three on every seed measured, docs/methods.md, lasso);
    # `none`: selection only, to ablate. true / false read as layer / none.
    refit: Literal["layer", "residual", "none"] | bool = "residual"
    max_ratio: float = 0.9
    batch_size: int = 128

    def __post_init__(self):
        if self.images < 1 or self.points < 1 or self.lasso_rows < 2 or self.batch_size < 1:
            raise BadValue("lasso: images, points and batch_size must be >= 1, lasso_rows >= 2")
        if not self.alpha > 0 or self.rank_tol < 0:
            raise BadValue("lasso: alpha must be > 0 and rank_tol >= 0")
        if not 0 < self.max_ratio < 1:
            raise BadValue(f"lasso: max_ratio must be in (0, 1), got {self.max_ratio}")
        if isinstance(self.refit, bool):
            object.__setattr__(self, "refit", "layer" if self.refit else "none")
        if self.refit not in ("layer", "residual", "none"):
            raise BadValue(f"lasso: refit must be layer, residual or none, got {self.refit!r}")


@register_criterion()
class Lasso(Criterion):
    name = "lasso"
    paper = "1707.06168"
    needs = frozenset({"data"})
    summary = "LASSO channel selection on the next layer's output, least-squares refit (plan with new weights)"
    Options = LassoOptions

    @torch.no_grad()
    def run(self, ctx: Context) -> Plan:
        o = self.options
        calib = ctx.require_calib()
        counts = uniform_counts(ctx, o.max_ratio)
        gen = ctx.generator(salt=17)
        n_img = min(o.images, len(calib))
        order = torch.randperm(len(calib), generator=gen)[:n_img].sort().values if n_img < len(calib) else None
        images = calib.x if order is None else calib.x[order]
        follow = following_norms(ctx.model, ctx.example_input)
        original, current = ctx.model, ctx.model
        if o.refit == "residual":  # consumer -> the module whose output meets a shortcut in a residual sum
            sites = {n: follow.get(n, n) for g in ctx.groups for n in {c.module for c in g.consumers}}
            found = _shortcut_operands(ctx.model, ctx.example_input, set(sites.values()))
            residual = {n: site for n, site in sites.items() if site in found}
            ctx.log(f"lasso: {len(residual)} consumers refit to the original residual sum (shortcut drift absorbed)")
        else:
            residual = {}
        keep: dict[str, Tensor] = {}
        touched: set[str] = set()
        self.report: dict[str, dict[str, float]] = {}  # consumer -> relative sample errors before/after refit
        todo = [g for g in ctx.groups if counts.get(g.id, g.size) < g.size]
        advance = ctx.progress("lasso channel selection", len(todo))
        for step, g in enumerate(todo):
            k = counts[g.id]
            rows = _output_rows(g, ctx.all_groups, keep)
            consumers = _supported_consumers(g, dict(current.named_modules()), dict(original.named_modules()), rows)
            if consumers is None:
                kept = _l1_keep(g, dict(current.named_modules()), k)
                ctx.log(f"lasso: group {g.id} has a consumer that cannot be refit; kept its largest-L1 filters")
                current = ctx.prune({g.id: kept}, model=current)
            else:
                samples = _sample(original, current, consumers, rows, images, o, ctx, salt=step, residual=residual)
                kept = select_channels(samples, k, o, seed=ctx.seed + step)
                overrides = {}
                if o.refit != "none":
                    for c in consumers:
                        overrides.update(self._refit(c, samples[c.module], kept, current, original, follow))
                    touched.update(overrides)
                current = ctx.prune({g.id: kept}, overrides, model=current)
            keep[g.id] = kept
            advance(1)
        state = current.state_dict()
        overrides = {name: state[name].detach().clone() for name in sorted(touched)}
        ctx.log(f"lasso: {len(keep)} groups pruned, {len(touched)} tensors refit")
        return Plan(keep, overrides)

    def _refit(
        self, c: Member, s: _Samples, kept: Tensor, current: nn.Module, original: nn.Module, follow: dict[str, str]
    ) -> dict[str, Tensor]:
        """Least-squares weights (and bias) of consumer `c` on the kept channels; overrides for the pruned model."""
        layer = current.get_submodule(c.module)
        x = s.x[:, kept].flatten(1).double()  # (S, c' * kk)
        bias_site = None
        if layer.bias is not None:  # Y was taken minus the original bias: the fitted intercept adds to it
            bias = original.get_submodule(c.module).bias.detach().cpu()
            bias_site = (f"{c.module}.bias", bias if s.rows is None else bias[s.rows])
        elif c.module in follow:
            bn = current.get_submodule(follow[c.module])
            bias_site = (f"{follow[c.module]}.running_mean", bn.running_mean.detach().cpu())
        design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1) if bias_site else x
        solution = torch.linalg.lstsq(design, s.y.double()).solution  # (c'kk [+1], n)
        w_new = solution[: x.shape[1]].T.reshape(s.w.shape[0], len(kept), *s.w.shape[2:])
        before = x @ s.w[:, kept].flatten(1).double().T
        after = design @ solution
        denom = max(float(s.y.double().pow(2).sum()), 1e-30)
        self.report[c.module] = {
            "before": float((s.y.double() - before).pow(2).sum()) / denom,
            "after": float((s.y.double() - after).pow(2).sum()) / denom,
        }
        out = {f"{c.module}.weight": w_new.reshape(layer.weight.shape[0], -1, *layer.weight.shape[2:]).float()}
        if bias_site:
            name, old = bias_site
            b = solution[-1].float()
            out[name] = old - b if name.endswith("running_mean") else old + b
        return out


# ------------------------------------------------------------------------------------------------- sampling
@dataclass
class _Samples:
    """One consumer's samples: x (S, c, kk) input patches (current model), y (S, n) original output minus bias,
    w (n, c, kh, kw) or (n, c, expand) the consumer's current weights over the group's channels."""

    x: Tensor
    y: Tensor
    w: Tensor
    rows: Tensor | None = None  # the original outputs kept so far (None: all)


class _Stop(Exception):
    """Raised by a hook once every module of interest has run, to skip the rest of the forward pass."""


def _output_rows(
    g: ChannelGroup, all_groups: tuple[ChannelGroup, ...], keep: dict[str, Tensor]
) -> dict[str, Tensor | None]:
    """{consumer: indices of its original outputs that an earlier group of the plan kept (None: all)}.

    Only with scope `all` can a consumer's outputs be pruned before its inputs (a residual group comes first).
    """
    rows: dict[str, Tensor | None] = {}
    for c in g.consumers:
        rows[c.module] = None
        for h in all_groups:
            if h.id in keep and any(m.module == c.module and m.kind in ("conv_out", "linear_out") for m in h.members):
                m = next(m for m in h.members if m.module == c.module and m.kind in ("conv_out", "linear_out"))
                rows[c.module] = keep[h.id] + m.offset if m.offset == 0 else torch.empty(0, dtype=torch.int64)
    return rows


def _supported_consumers(
    g: ChannelGroup, current: dict[str, nn.Module], original: dict[str, nn.Module], rows: dict[str, Tensor | None]
) -> list[Member] | None:
    out = []
    for c in g.consumers:
        layer, base = current[c.module], original[c.module]
        if c.kind == "conv_in":
            ok = isinstance(layer, nn.Conv2d) and layer.groups == 1 and layer.padding_mode == "zeros"
            ok = ok and not isinstance(layer.padding, str) and c.offset == 0 and layer.in_channels == g.size
        elif c.kind == "linear_in":
            ok = isinstance(layer, nn.Linear) and c.offset == 0 and layer.in_features == g.size * c.expand
        else:
            ok = False
        # Y comes from the original layer: its outputs kept so far must be known
        kept_out = base.weight.shape[0] if rows[c.module] is None else len(rows[c.module])
        if not ok or kept_out == 0 or layer.weight.shape[0] != kept_out:
            return None
        out.append(c)
    return out or None


@torch.no_grad()
def _capture(model: nn.Module, x: Tensor, names: list[str], want_input: bool) -> dict[str, Tensor]:
    """Inputs (or outputs) of the named modules for one batch, stopping the forward once all have run."""
    got: dict[str, Tensor] = {}
    modules = dict(model.named_modules())

    def hook(name):
        def fn(_m, args, out):
            got[name] = (args[0] if want_input else out).detach()
            if len(got) == len(names):
                raise _Stop

        return fn

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        model(x)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return got


def _patches(x: Tensor, conv: nn.Conv2d, flat: Tensor, out_w: int) -> Tensor:
    """Zero-padded input patches (B, P, c, kh, kw) of `conv` at flat output positions `flat` (B, P)."""
    ph, pw = conv.padding
    sh, sw = conv.stride
    dh, dw = conv.dilation
    kh, kw = conv.kernel_size
    xp = F.pad(x, (pw, pw, ph, ph))
    oh, ow = flat // out_w, flat % out_w
    dev = x.device
    rows = (oh * sh)[..., None, None] + (torch.arange(kh, device=dev) * dh)[:, None]  # (B, P, kh, 1)
    cols = (ow * sw)[..., None, None] + (torch.arange(kw, device=dev) * dw)[None, :]  # (B, P, 1, kw)
    b = torch.arange(len(x), device=dev)[:, None, None, None]
    return xp[b, :, rows, cols].permute(0, 1, 4, 2, 3)  # advanced indices first: (B, P, kh, kw, c) -> (B, P, c, ..)


class _AddOperands(TorchFunctionMode):
    """Records, for each watched tensor, the other operand of the first addition that reads it (a shortcut)."""

    ADDS = frozenset({torch.add, Tensor.add, Tensor.add_, Tensor.__add__, Tensor.__radd__, Tensor.__iadd__})

    def __init__(self, watched: dict[int, tuple[str, Tensor]], found: dict[str, Tensor], wanted: int):
        super().__init__()
        self.watched, self.found, self.wanted = watched, found, wanted

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.ADDS and len(args) >= 2 and all(isinstance(a, Tensor) for a in args[:2]):
            for mine, other in ((args[0], args[1]), (args[1], args[0])):
                site = self.watched.get(id(mine))
                if site is not None and site[1] is mine and site[0] not in self.found and other.shape == mine.shape:
                    self.found[site[0]] = other.detach().clone()  # cloned before an in-place add or ReLU
        out = func(*args, **(kwargs or {}))
        if len(self.found) == self.wanted:
            raise _Stop
        return out


@torch.no_grad()
def _shortcut_operands(model: nn.Module, x: Tensor, sites: set[str]) -> dict[str, Tensor]:
    """{site: the tensor added to the site module's output} for the sites whose output enters a residual sum,
    (B, C, H, W) like the site's output; sites whose output is not summed with a same-shaped tensor are absent."""
    watched: dict[int, tuple[str, Tensor]] = {}  # the tensor is held so that its id is not reused
    found: dict[str, Tensor] = {}
    modules = dict(model.named_modules())
    handles = [
        modules[n].register_forward_hook(lambda _m, _a, out, n=n: watched.__setitem__(id(out), (n, out))) for n in sites
    ]
    was_training = model.training
    try:
        model.eval()
        with _AddOperands(watched, found, len(sites)):
            model(x)
    except _Stop:
        pass
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return found


def _bn_scale(model: nn.Module, site: str) -> Tensor:
    """Per-channel factor from a conv's output to its BatchNorm's output in eval mode (C,); ones without one."""
    m = model.get_submodule(site)
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
        gamma = m.weight.detach() if m.weight is not None else torch.ones_like(m.running_var)
        return gamma / (m.running_var + m.eps).sqrt()
    return torch.ones(m.weight.shape[0], device=m.weight.device) if hasattr(m, "weight") else torch.ones(())


@torch.no_grad()
def _sample(
    original: nn.Module, current: nn.Module, consumers: list[Member], rows: dict[str, Tensor | None], images: Tensor,
    o: LassoOptions, ctx: Context, salt: int, residual: dict[str, str] | None = None,
) -> dict[str, _Samples]:  # fmt: skip
    """Per consumer its samples. With `residual` ({consumer: site}), a conv consumer whose site output is summed with
    a shortcut gets the target Y + (shortcut_original - shortcut_current) / a, a the site BatchNorm's scale: its
    refit output then makes the current sum equal the original one (He et al., section 3.3, multi-branch)."""
    gen = ctx.generator(salt=1000 + salt)
    names = [c.module for c in consumers]
    drift = {c.module: residual[c.module] for c in consumers if residual and c.module in residual}
    layers = {c.module: current.get_submodule(c.module) for c in consumers}
    base = {c.module: original.get_submodule(c.module) for c in consumers}
    xs: dict[str, list[Tensor]] = {n: [] for n in names}
    ys: dict[str, list[Tensor]] = {n: [] for n in names}
    for i in range(0, len(images), o.batch_size):
        batch = images[i : i + o.batch_size].to(ctx.device)
        outs = _capture(original, batch, names, want_input=False)
        ins = _capture(current, batch, names, want_input=True)
        if drift:
            sites = set(drift.values())
            sc_orig, sc_cur = _shortcut_operands(original, batch, sites), _shortcut_operands(current, batch, sites)
        for c in consumers:
            n, y, x = c.module, outs[c.module], ins[c.module]
            if base[n].bias is not None:
                y = y - (base[n].bias.view(1, -1, 1, 1) if y.dim() == 4 else base[n].bias)
            if rows[n] is not None:
                y = y[:, rows[n].to(y.device)]
            if n in drift and y.dim() == 4 and drift[n] in sc_orig and drift[n] in sc_cur:
                d = sc_orig[drift[n]]
                d = (d if rows[n] is None else d[:, rows[n].to(d.device)]) - sc_cur[drift[n]]
                if d.shape == y.shape:  # else (residual channels pruned differently) the layer's own output
                    a = _bn_scale(current, drift[n]).to(y.device).view(1, -1, 1, 1)
                    # a channel whose BatchNorm nearly zeroes it cannot absorb a drift: leave its target alone
                    y = y + torch.where(a.abs() > 1e-3, d / torch.where(a.abs() > 1e-3, a, 1.0), 0.0)
            if isinstance(layers[n], nn.Conv2d):
                flat = torch.randint(y.shape[2] * y.shape[3], (len(y), o.points), generator=gen).to(y.device)
                picked = y.flatten(2).gather(2, flat[:, None].expand(-1, y.shape[1], -1))  # (B, n, P)
                ys[n].append(picked.transpose(1, 2).flatten(0, 1))
                xs[n].append(_patches(x, layers[n], flat, y.shape[3]).flatten(0, 1).flatten(2))
            else:
                ys[n].append(y.flatten(1))
                xs[n].append(x.flatten(1).view(len(x), -1, c.expand))
    out = {}
    for c in consumers:
        w = layers[c.module].weight.detach()
        w = w if w.dim() == 4 else w.view(w.shape[0], -1, c.expand)
        x, y = torch.cat(xs[c.module]).float().cpu(), torch.cat(ys[c.module]).float().cpu()
        out[c.module] = _Samples(x, y, w.cpu(), rows[c.module])
    return out


# ------------------------------------------------------------------------------------------------ selection
def select_channels(samples: dict[str, _Samples], k: int, o: LassoOptions, seed: int = 0) -> Tensor:
    """The k channels (sorted int64) chosen by the LASSO over per-channel contributions of all consumers."""
    gram, aty, m = _normal_equations(samples, o.lasso_rows, seed)
    c = gram.shape[0]
    diag = gram.diagonal().clone()
    # R^T R = G from the eigendecomposition (robust where G is singular: few rows, dead channels, float32 sums);
    # A^T y lies in the range of G, so ||y - A b||^2 = ||q - R b||^2 + const with q = Lambda^-1/2 V^T A^T y
    lam, vec = torch.linalg.eigh((gram + gram.T) / 2)
    good = lam > lam.max().clamp_min(1e-300) * 1e-12
    root = lam.clamp_min(0).sqrt()
    r = (root[:, None] * vec.T).numpy()
    q = torch.where(good, (vec.T @ aty) / root.clamp_min(1e-300), torch.zeros_like(root)).numpy()
    from sklearn.linear_model import Lasso as SkLasso

    solver = SkLasso(fit_intercept=False, warm_start=True, selection="random", random_state=seed, max_iter=5000)

    def fit(lam: float) -> Tensor:
        solver.set_params(alpha=lam * m / c)  # the same objective with c rows instead of m
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence warnings at tiny lambdas do not change the support much
            solver.fit(r, q)
        return torch.from_numpy(solver.coef_.copy())

    def nnz(beta: Tensor) -> int:
        return int((beta != 0).sum())

    lam = o.alpha
    beta = fit(lam)
    if nnz(beta) >= k:  # double until fewer than k survive
        lo, best = lam, beta
        for _ in range(60):
            lam *= 2
            beta = fit(lam)
            if nnz(beta) < k:
                break
            lo, best = lam, beta
        hi = lam
    else:  # already too sparse: halve until at least k survive
        hi = lam
        lo, best = 0.0, None
        for _ in range(60):
            lam /= 2
            beta = fit(lam)
            if nnz(beta) >= k:
                lo, best = lam, beta
                break
            hi = lam
    if best is not None:
        for _ in range(30):
            if nnz(best) <= math.ceil(k * (1 + o.rank_tol)):
                break
            mid = (lo + hi) / 2
            beta = fit(mid)
            if nnz(beta) < k:
                hi = mid
            else:
                lo, best = mid, beta
    else:
        best = beta
    # exactly k: largest |beta| first; ties (zeros) by the channel's contribution energy, then by index
    key = best.abs() * (diag.max() + 1) + diag
    order = torch.sort(-key, stable=True).indices
    return order[:k].sort().values.to(torch.int64)


def _normal_equations(samples: dict[str, _Samples], rows: int, seed: int) -> tuple[Tensor, Tensor, int]:
    """Centred Gram matrix A^T A (c, c), A^T y (c,) and the row count M of the stacked LASSO design, whose column i
    is vec(Z_i) = vec(X_i W_i^T) over `rows` sampled rows of every consumer."""
    gen = torch.Generator().manual_seed(seed)
    gram = aty = colsum = None
    ysum, m = 0.0, 0
    for s in samples.values():
        idx = torch.randperm(len(s.x), generator=gen)[: min(rows, len(s.x))]
        x, y = s.x[idx].float(), s.y[idx].float()
        w = s.w.float().flatten(2)  # (n, c, kk)
        c = x.shape[1]
        if gram is None:
            gram, aty = torch.zeros(c, c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
            colsum = torch.zeros(c, dtype=torch.float64)
        for j in range(0, w.shape[0], 64):  # chunks of outputs keep Z (rows, chunk, c) small
            z = torch.einsum("sck,nck->snc", x, w[j : j + 64]).reshape(-1, c)
            yc = y[:, j : j + 64].reshape(-1)
            gram += (z.T @ z).double()  # float32 products (2-4x faster), float64 sums
            aty += (z.T @ yc).double()
            colsum += z.double().sum(0)
            ysum += float(yc.sum())
            m += len(yc)
    gram = gram - torch.outer(colsum, colsum) / m  # the intercept: centre columns and target
    aty = aty - colsum * ysum / m
    return gram, aty, m


def _l1_keep(g: ChannelGroup, modules: dict[str, nn.Module], k: int) -> Tensor:
    parts = []
    for p in g.producers:
        s = modules[p.module].weight.detach().abs().flatten(1).sum(1)[p.offset : p.offset + g.size].double()
        parts.append(s / s.mean().clamp_min(1e-12))
    score = torch.stack(parts).mean(0)
    return torch.sort(-score, stable=True).indices[:k].sort().values.to(torch.int64)
