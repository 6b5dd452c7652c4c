"""ManiDP's training: the sparsity and manifold losses, the remain-rate schedules and thresholds, the training hooks,
the BatchNorm re-estimation after training, and the static estimate of the remain rate for a MACs target (see the
module docstring of criteria/manidp/__init__.py for the method and its defaults)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prune_cli.api import TrainHooks, recalibrate_batchnorm
from prune_cli.errors import BadValue

if TYPE_CHECKING:
    from criteria.manidp import GatedConv2d


def gated_layers(model: nn.Module) -> list[GatedConv2d]:
    from criteria.manidp import gated_layers as layers  # the gates live there; imported late (no import cycle)

    return layers(model)


# -------------------------------------------------------------------------------------------------- losses
def cosine_gram(v: Tensor) -> Tensor:
    """(B, D) -> (B, B) cosine similarities of the rows."""
    u = F.normalize(v.flatten(1).float(), dim=1)
    return u @ u.t()


def manifold_loss(features: list[Tensor], saliencies: list[Tensor]) -> Tensor:
    """sum_l ||T_l - R_l||_F^2 / B^2 with T, R the cosine Gram matrices of features and saliencies."""
    total = features[0].new_zeros((), dtype=torch.float32)
    for f, s in zip(features, saliencies, strict=True):
        total = total + (cosine_gram(f) - cosine_gram(s)).pow(2).sum() / f.shape[0] ** 2
    return total


def instance_weights(ce: Tensor, complexity: float, gamma: float = 1.0) -> Tensor:
    """beta_i = max(0, (C - CE_i) / C)^gamma: easy instances (low CE) are pruned harder; hard ones not at all."""
    c = max(float(complexity), 1e-12)
    return ((c - ce.detach().float()) / c).clamp_min(0.0).pow(gamma)


def sparsity_loss(saliencies: list[Tensor], beta: Tensor) -> Tensor:
    """sum_l mean_i(beta_i * mean_c pi_ic) on the pre-threshold saliencies."""
    return sum((beta * s.float().mean(1)).mean() for s in saliencies)


def remain_rate(epoch: int, epochs: int, target: float) -> float:
    """r(e) = (1+t)/2 + (1-t)/2 cos(pi (e+1)/E): 1 at the start, t after the last epoch (0-based e)."""
    return (1 + target) / 2 + (1 - target) / 2 * math.cos(math.pi * (epoch + 1) / epochs)


@torch.no_grad()
def refresh_batchnorm(model: nn.Module, images: Tensor, batch_size: int = 256) -> None:
    """Re-estimate the BatchNorm running statistics (cumulative average) on `images` (N, C, H, W) with the gates as
    they are: while the thresholds moved, the running averages mixed masks of different sparsity."""
    recalibrate_batchnorm(model, images, batch_size=batch_size)


@torch.no_grad()
def fit_thresholds(model: nn.Module, images: Tensor, rate: float) -> None:
    """Eval mode: each gated layer's threshold becomes the (1 - `rate`) quantile of its saliencies pi_ic over
    `images` (N, C, H, W) and its channels, so that a share `rate` of the per-input keep decisions passes at
    inference. Set in forward order, in one pass: a layer's saliencies depend on the thresholds above it."""

    def hook(gate: nn.Module, args, pi: Tensor) -> None:
        gate.threshold.fill_(float(torch.quantile(pi.float().flatten(), 1.0 - rate)))

    handles = [conv.gate.register_forward_hook(hook) for conv in gated_layers(model)]
    was_training = model.training
    model.eval()
    try:
        model(images)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def fit_to_macs(model: nn.Module, images: Tensor, budget: float, steps: int = 12) -> tuple[float, float]:
    """The thresholds (`fit_thresholds`) of the largest rate whose mean per-input MACs on `images` (N, C, H, W) stay
    within `budget`, by bisection; returns (rate, mean MACs). Training sets the thresholds on training-mode
    saliencies (batch statistics), which are not those of inference: there the same thresholds keep more channels
    than the target (docs/methods.md, ManiDP)."""
    from prune_cli.api.dynamic import per_input_macs

    def macs_at(rate: float) -> float:
        fit_thresholds(model, images, rate)
        return float(per_input_macs(model, images)[0].mean())

    lo, hi = 0.0, 1.0
    if macs_at(hi) <= budget:
        return hi, macs_at(hi)
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if macs_at(mid) <= budget else (lo, mid)
    return lo, macs_at(lo)


def ramp_rate(progress: float, start: float, end: float, target: float) -> float:
    """Remain rate at a fraction `progress` of the training steps (schedule=ramp): 1 until `start`, then a cosine
    down to `target` at `end`, then `target`."""
    x = min(1.0, max(0.0, (progress - start) / max(end - start, 1e-9)))
    return target + (1 - target) * 0.5 * (1 + math.cos(math.pi * x))


def threshold_for(mean_saliency: Tensor, rate: float) -> float:
    """The k-th largest mean saliency, k = ceil(rate * C)."""
    k = min(len(mean_saliency), max(1, math.ceil(rate * len(mean_saliency) - 1e-9)))
    return float(mean_saliency.topk(k).values[-1])


class ManiDPHooks(TrainHooks):
    """Training hooks: sparsity + manifold loss per batch, thresholds and the complexity C per epoch."""

    def __init__(
        self, remain: float, lam: float, eta: float, gamma: float, thre_cls: float, complexity: float,
        ahead: bool = False, track_momentum: float | None = None, gate_lr: float = 1.0,
        log: Callable[[str], None] = lambda message: None, detach_features: bool = False,
        ramp: tuple[float, float] | None = None, bn_images: Tensor | None = None,
        fit: Callable[[nn.Module], float] | None = None, final_fit: bool = True, refit_at_ramp_end: bool = False,
    ):  # fmt: skip
        self.bn_images = bn_images  # re-estimate BatchNorm statistics on these after the last epoch (None: no)
        self.fit = fit  # sets the thresholds in eval mode and returns the rate it set (None: training's only)
        self.final_fit = final_fit  # `fit` after the last epoch
        self.refit_at_ramp_end = refit_at_ramp_end  # `fit` when the ramp reaches t; the rest trains at its rate
        self.log, self.detach_features = log, detach_features
        # schedule=ramp: (start, end) fractions of the training steps between which the rate falls from 1 to t
        self.ramp, self.step, self.total_steps = ramp, 0, 0
        self.remain, self.lam, self.eta, self.gamma, self.thre_cls = remain, lam, eta, gamma, thre_cls
        self.gate_lr = gate_lr  # learning-rate multiplier of the gates (they start from scratch; the rest fine-tunes)
        self.ahead = ahead  # thresholds for the next epoch's rate, so that the last epoch trains at the target
        self.track_momentum = track_momentum  # None: thresholds fixed for an epoch; else they follow an EMA per step
        self.rate: float | None = None  # the rate the current epoch trains at (None: no thresholds yet)
        self.ema: list[Tensor] | None = None
        self.complexity = complexity
        self.history: list[dict[str, Any]] = []
        self._reset()

    def _reset(self) -> None:
        self.ce_sum, self.seen, self.saliency_max, self.extra_sum, self.steps = 0.0, 0, 0.0, 0.0, 0
        self.saliency_sums: list[Tensor] | None = None

    def extra_loss(self, model, x, y, logits, per_sample_ce):
        layers = gated_layers(model)
        pis = [conv.last_saliency for conv in layers]
        feats = [conv.last_feature for conv in layers]
        if self.detach_features:  # the features are the manifold the gates align to; only the gates move
            feats = [f.detach() for f in feats]
        beta = instance_weights(per_sample_ce, self.complexity, self.gamma)
        with torch.no_grad():
            self.ce_sum += float(per_sample_ce.detach().float().sum())
            self.seen += len(per_sample_ce)
            sums = [p.detach().float().sum(0) for p in pis]
            old = self.saliency_sums
            self.saliency_sums = sums if old is None else [a + b for a, b in zip(old, sums, strict=True)]
            if self.ramp is not None and self.total_steps:
                self.step += 1
                start, end = self.ramp
                progress = self.step / self.total_steps
                if progress > start:
                    self.rate = ramp_rate(progress, start, end, self.remain)
                    self._follow_quantiles(layers, pis)
                if progress >= end and self.refit_at_ramp_end and self.fit is not None:
                    # The quantiles of training-mode saliencies (batch statistics) at the estimated rate t do not
                    # meet the MACs target at inference; the rate that does, found in eval mode now, is the one the
                    # rest of training follows, so the masks it adapts to are nearly those of inference.
                    self.refit_at_ramp_end = False
                    self.remain = self.rate = self.fit(model)
                    self.ema = None
                    self.log(f"manidp: the ramp ends at rate {self.rate:.3f}, which meets the target in eval mode")
            elif self.track_momentum is not None and self.rate is not None:
                self._track(layers, [s / len(per_sample_ce) for s in sums])
            self.saliency_max = max(self.saliency_max, max(float(p.detach().max()) for p in pis))
        extra = self.lam * sparsity_loss(pis, beta) + self.eta * manifold_loss(feats, pis)
        self.extra_sum, self.steps = self.extra_sum + float(extra.detach()), self.steps + 1
        return extra

    def on_train_start(self, model, steps_per_epoch, epochs):
        self.step, self.total_steps = 0, steps_per_epoch * epochs

    def on_epoch_end(self, model, epoch, epochs, stats):
        if self.seen:
            self.complexity = self.thre_cls * self.ce_sum / self.seen
        record: dict[str, Any] = {"epoch": epoch, "complexity": self.complexity, "saliency_max": self.saliency_max,
                                  "extra_loss": self.extra_sum / max(self.steps, 1)}  # fmt: skip
        if self.saliency_sums is not None and self.seen:
            record["saliency_mean"] = float(torch.cat(self.saliency_sums).mean()) / self.seen
        if self.ramp is not None:
            if self.rate is not None:
                record["rate"] = self.rate
        elif epoch >= 1 and self.saliency_sums is not None:
            rate = remain_rate(min(epoch + self.ahead, epochs - 1), epochs, self.remain)
            if not (self.ahead and epoch == epochs - 1):
                self.rate, self.ema = rate, [total / self.seen for total in self.saliency_sums]
                for conv, mean in zip(gated_layers(model), self.ema, strict=True):
                    conv.gate.threshold.fill_(threshold_for(mean, rate))
            record["rate"] = rate
        self.history.append(record)
        kept = f", remain rate {self.rate:.3f}" if self.rate is not None else ""
        self.log(f"manidp epoch {epoch + 1}: saliency mean {record.get('saliency_mean', float('nan')):.4f}, max "
                 f"{self.saliency_max:.4f}, sparsity + manifold loss {record['extra_loss']:.4f}{kept}")  # fmt: skip
        if isinstance(stats, dict):  # into the run's training history (kept in the model file)
            stats["manidp"] = {k: v for k, v in record.items() if k != "epoch"}
        if epoch == epochs - 1:
            self.finish(model)
        self._reset()

    def finish(self, model: nn.Module) -> None:
        """After the last epoch: BatchNorm statistics with the final gates, then eval-mode thresholds; twice when
        both are on, since each moves the other's input a little."""
        fit = self.fit if self.final_fit else None
        for _ in range(2 if fit is not None and self.bn_images is not None else 1):
            if self.bn_images is not None:
                refresh_batchnorm(model, self.bn_images)
            if fit is not None:
                fit(model)

    def _follow_quantiles(self, layers: list[GatedConv2d], pis: list[Tensor]) -> None:
        """schedule=ramp: each layer's threshold follows (moving average, `track_momentum`) the (1 - rate) quantile
        of the batch's saliencies pi_ic (N, C), so that a share `rate` of the per-input decisions keeps its channel."""
        m = self.track_momentum if self.track_momentum is not None else 0.0
        q = [torch.quantile(p.detach().float().flatten(), 1.0 - self.rate) for p in pis]
        self.ema = q if self.ema is None else [m * e + (1 - m) * b for e, b in zip(self.ema, q, strict=True)]
        for conv, t in zip(layers, self.ema, strict=True):
            conv.gate.threshold.fill_(float(t))

    def _track(self, layers: list[GatedConv2d], batch_means: list[Tensor]) -> None:
        """Move each layer's threshold to the k-th largest of the moving average of its batch-mean saliencies."""
        m = self.track_momentum
        self.ema = [m * e + (1 - m) * b for e, b in zip(self.ema, batch_means, strict=True)]
        for conv, mean in zip(layers, self.ema, strict=True):
            conv.gate.threshold.fill_(threshold_for(mean, self.rate))

    def no_weight_decay(self, name: str) -> bool:
        return ".gate." in name or name.startswith("gate.")

    def lr_scale(self, name: str) -> float:
        return self.gate_lr if self.no_weight_decay(name) else 1.0


def estimate_remain(base: nn.Module, gated: nn.Module, example_input: Tensor, keep: float) -> float:
    """t such that gated convs at t (t^2 when their input is gated too), with their gates' overhead (pooling, two FC
    layers, one product per kept output value), and input-gated-only convs at t keep `keep` of the base model's
    MACs."""
    from criteria.manidp import InputGatedConv2d
    from prune_cli.api.dynamic import per_input_macs

    layers = gated_layers(gated)
    inputs_only = [m for m in gated.modules() if isinstance(m, InputGatedConv2d)]
    costs: dict[int, float] = {}
    fixed: dict[int, float] = {}
    scaled: dict[int, float] = {}

    def hook(m, args, out):
        costs[id(m)] = float(out[0].numel() * m.in_channels * m.kernel_size[0] * m.kernel_size[1])  # per sample
        if not isinstance(m, InputGatedConv2d):  # a gated conv: its gate's cost, and one product per kept output
            fixed[id(m)], scaled[id(m)] = float(args[0][0].numel() + m.gate.macs), float(out[0].numel())

    handles = [c.register_forward_hook(hook) for c in layers + inputs_only]
    try:
        with torch.no_grad():
            gated(example_input[:1].repeat(2, 1, 1, 1))  # batch 2: batch 1 runs compact, not the convs' forward
    finally:
        for h in handles:
            h.remove()
    dense = float(per_input_macs(base, example_input[:1])[0][0])
    rest = dense - sum(costs.values())

    def kept(t: float) -> float:
        gated_cost = sum(costs[id(c)] * (t * t if c.prev is not None else t) + scaled[id(c)] * t for c in layers)
        gated_cost += sum(costs[id(c)] * t for c in inputs_only)
        return rest + sum(fixed.values()) + gated_cost

    if kept(0.0) > keep * dense:
        raise BadValue(f"manidp cannot reach -{100 * (1 - keep):.0f}% MACs: the ungated layers alone cost more")
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if kept(mid) <= keep * dense else (lo, mid)
    return max(lo, 1e-3)
