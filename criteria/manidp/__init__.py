"""ManiDP: Tang, Wang, Xu, Deng, Xu, Tao, Xu, "Manifold Regularized Dynamic Network Pruning", CVPR 2021
(arXiv 2103.05861; official code huawei-noah/Pruning, ManiDP/). Returns a Dynamic model with training hooks.

Gates (METHODS.md section 8): every gated conv gets a gate computed from the conv's input,
    p = GAP(z);  h = ReLU(W1 p);  pi = min(ReLU(W2 h + b2), clamp_max)        (W1: hidden x C_in, no bias)
with hidden = C_out if C_out < 80 else C_out / squeeze_rate, b2 initialised to 1.0, and the mask
    m = pi * 1[pi >= xi_l]                                                    (kept channels are scaled by pi)
applied to the output of the conv's BatchNorm (before the ReLU, which commutes with m >= 0). Where the gates go is
read from the model's structure (criteria/manidp/sites.py): in ResNet blocks (basic or bottleneck, prune-cli's or
torchvision's) every conv of the block's own path; in VGGs every conv but the stem. Shortcuts, the stem and the
classifier are never gated. The selection scope decides, as for every other criterion, whether the residual stream
loses channels: under `--scope internal` (the default) a block's last conv, whose output is added into the residual
sum, keeps all its output channels and only reads its predecessor's kept ones (`InputGatedConv2d`); under
`--scope all` it is gated too, as in the official code. On digits (ResNet-20, 3 epochs, -30% MACs) the internal
gates read 95.54 / 97.49% (seeds 0 / 1) where gating the residual stream read 94.99 / 89.97% (docs/methods.md).

Loss (hooks.extra_loss, added to the engine's mean cross entropy):
    lambda * sum_l mean_i(beta_i * mean_c pi_ic) + eta * sum_l ||T_l - R_l||_F^2 / B^2
with beta_i = max(0, (C - CE_i) / C)^gamma, C = thre_cls * mean train CE of the previous epoch (before the first
epoch: the gated model's mean CE on the calibration split, in eval mode), T_l / R_l the cosine Gram matrices of
the layer's pooled pre-mask features (after the ReLU where the layer has one, as the official code pools
conv_a's ReLU output and conv_b's BN output) and of its pre-threshold saliencies.

Thresholds. `schedule=official`: after each 0-based epoch e >= 1, xi_l = the k-th largest epoch-mean saliency of
layer l, k = ceil(r(e) * C_l), r(e) = (1+t)/2 + (1-t)/2 cos(pi (e+1)/E); xi starts at -10000 (nothing thresholded).
The thresholds of rate t are set after the LAST epoch, so the network never trains at its final sparsity: over the
paper's 400 epochs that last step is tiny, over a short budget it is large (Fashion-MNIST ResNet-20, 3 epochs:
90.6% validation top-1 before the last update, 52.4% test top-1 after it). `schedule=ahead` sets after epoch e the
thresholds of r(e+1) and keeps the last ones; `schedule=track` is `ahead` whose thresholds follow a moving average
(momentum `track_momentum`) of the batches' mean saliencies every step. Both still train only the last epoch of a
3-epoch run at any sparsity, at the end of the cosine learning rate.

`schedule=ramp` (default, ours): the rate falls per step, 1 until a share `ramp_start` of the training steps, then
a cosine down to t at `ramp_end`, then t; after every step each layer's threshold moves (moving average,
`track_momentum`) to the (1 - rate) quantile of the batch's saliencies pi_ic over inputs and channels, so that a
share `rate` of the per-input keep decisions passes. The official rule (k-th largest MEAN saliency) keeps k channels
only when channels differ more than inputs do; with the nearly equal saliencies of a short training it does not
(digits ResNet-20 at rate 0.946: 44-84% of the decisions kept per layer, validation 15%).

Defaults that depart from the official code for short budgets (measured reasons in docs/methods.md):
- `clamp_max` 2 (official 1000): saliencies lie in [0, 2] by construction, as the official gate bounds them, but
  with a bound that cannot compound over the blocks.
- `gate_lr` 30: the gates, trained from scratch, learn 30x faster than the fine-tuned weights (official: same lr).
  At 1x their saliencies stay within 1% of 1 after 3 epochs, so the thresholds pick channels by noise.
- `bn_refresh`: the BatchNorm statistics are re-estimated on the calibration images after the last epoch, with the
  final gates: while the thresholds moved, the running averages mixed masks of different sparsity.
- `manifold_grad` "gates": the manifold term trains the gates only; trained into the features too, it bent the
  pretrained network towards the gates' similarity structure and cost accuracy over a short budget.
- Thresholds that meet the target at inference: training's quantiles come from training-mode saliencies (batch
  statistics), and the same thresholds keep more channels in eval mode. `refit_at_ramp_end`: when the ramp reaches
  t, the rate whose eval-mode thresholds (`fit_thresholds`, set layer by layer on calibration images) meet the MACs
  target replaces t for the rest of training; `fit_thresholds`: after the BatchNorm refresh, the same fit once more,
  so the reported per-input MACs are the target's.

t (`remain`): the target remain rate; by default derived from --target-macs by a static estimate (each gated
conv costs t^2 of its MACs when its input is gated too, t otherwise). The realised per-input MACs differ
(saliency decides per instance); `prune` reports them on the test set.

Inference: batch 1 in eval mode without autograd really skips masked channels, computing only kept channels end
to end (`GatedConv2d.compact`): each gated conv runs on the kept input channels into the kept output channels, with
its BatchNorm folded in and the kept channels' scales applied after the ReLU; its gate pools only the kept input
channels (the others are zero). A ResNet basic block (`GatedBlock`) passes conv1's kept channels to conv2 and adds
conv2's into the shortcut by index; VGG features (`GatedFeatures`) carry them through max-pools to the next gated
conv. No full-width zero tensor, BatchNorm or mask product is computed. The folded weights' slices are cached per
pair of kept sets (`Folded`), so an input whose gates choose sets seen before gathers no weights. Batches, training
and autograd run the convs dense and mask the BatchNorm output.
At CIFAR widths a batch-1 CPU conv's time follows its input channels more than its MACs (`python
benchmarks/dynamic.py conv-scaling`), so the latency gain stays well below the MAC gain.

Per-input MACs count the executed conv MACs plus the overhead: the gate's pooling (C_in H W additions), its two FC
layers and the scaling of the kept channels (one multiplication per kept output value).

`gate_init`: "l1" (default; `l1_start`: as "identity", with b2 spread around 1 in the order of the filters' L1
norms and each BatchNorm divided by its b2, so that the model still starts as the base and the ramp's first
thresholds drop what l1 would drop rather than channels at random), "identity" (W1 Kaiming-normal, W2 = 0, b2 = 1,
so pi = 1 for every input and the gated model starts as the pretrained base exactly) or "kaiming" (the official
code: W2 Kaiming-normal too). With the official init the untrained saliencies scale each block's output by up to the
clamp (1000); in eval mode (fixed BatchNorm statistics) that compounds over the blocks: on a digits ResNet-20 the
initial mean CE was 1e31 and SGD at lr 0.02 diverged within 3 steps, while the identity start trains stably. With
the l1 start the ramp can reach t early (by default at 30% of the steps), leaving most of the budget to train at
the final masks.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from criteria.manidp.sites import BlockPlan, block_plan, features_plan, gate_sites
from criteria.manidp.train import ManiDPHooks, estimate_remain, fit_thresholds, fit_to_macs
from prune_cli.api import Context, Dynamic, DynamicCriterion, register_criterion
from prune_cli.api.dynamic import DynamicModule, analysing, per_input_macs
from prune_cli.errors import BadValue

THRESHOLD_INIT = -10000.0
FIT_IMAGES = 512  # calibration images the eval-mode threshold fit uses (a bisection of about 12 forward passes)
# Weights of at least this many elements gather kept (out, in) filter pairs in one pass at batch 1; smaller ones in
# two (rows, then columns), which is cheaper there. Measured on 2 CPU threads: 64x64x3x3 two passes 9 us, one 14 us;
# 128x128x3x3 39 us against 26 us; 512x512x3x3 331 us against 195 us.
ONE_PASS_GATHER = 100_000
# The cached kept-set slices of one conv's folded weights hold at most this many times its weights, then start over.
SLICE_CACHE_WEIGHTS = 4


class Kept(NamedTuple):
    """The channels a compact step keeps: sorted indices (k,) and the keep mask's bytes (a cache key)."""

    index: Tensor
    key: bytes


@dataclass(eq=False)
class Folded:
    """A gated conv's compact-inference state: the conv and its BatchNorm folded into weight (C_out, C_in, kh, kw)
    and bias (C_out,); the gate's threshold, w2, b2 and clamp; the tensors it was built from (`sources`, with their
    `versions`); and caches: `slices` (in key, out key) -> (Kept, weight, bias) on those channels, and
    `gate_inputs` (in key, H W) -> the gate's w1 rows of the kept inputs divided by H W."""

    sources: tuple
    versions: tuple
    weight: Tensor
    bias: Tensor
    threshold: float = 0.0  # the gate's fields: none for an InputGatedConv2d
    w2: Tensor | None = None
    b2: Tensor | None = None
    clamp_max: float = 0.0
    slices: dict = field(default_factory=dict)
    gate_inputs: dict = field(default_factory=dict)
    slice_numel: int = 0

    def slice(self, kept: Tensor, incoming: Kept | None, key: tuple) -> tuple[Kept, Tensor, Tensor]:
        """Cache and return (Kept, weight (k_out, k_in, kh, kw), bias (k_out,)) on the kept inputs and outputs."""
        w = self.weight
        if self.slice_numel > SLICE_CACHE_WEIGHTS * w.numel():
            # only gates that choose many sets get here; simpler than LRU and as bounded. Every new input set also
            # makes a new slice, so clearing the gate's inputs here bounds them too.
            self.slices.clear()
            self.gate_inputs.clear()
            self.slice_numel = 0
        if incoming is None:
            w = w.index_select(0, kept)
        elif w.numel() < ONE_PASS_GATHER:
            w = w.index_select(0, kept).index_select(1, incoming.index)
        else:  # one gather of the (out, in) filter pairs: on wide layers two passes cost more than the kept conv
            pairs = (kept[:, None] * w.shape[1] + incoming.index).flatten()
            w = w.flatten(0, 1).index_select(0, pairs).view(len(kept), len(incoming.index), *w.shape[2:])
        self.slice_numel += w.numel()
        entry = self.slices[key] = (Kept(kept, key[1]), w, self.bias.index_select(0, kept))
        return entry


class SaliencyGate(nn.Module):
    """GAP -> W1 -> ReLU -> W2 + b2 -> ReLU -> clamp, with w1 (C_in, hidden) and w2 (hidden, C_out) stored
    input-major (one matmul each, no transpose). Raw parameters rather than nn.Linear: the model file records
    Linear layers as part of the architecture, and the gates are not part of the base model."""

    def __init__(self, c_in: int, c_out: int, hidden: int, clamp_max: float = 1000.0):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(c_in, hidden))
        self.w2 = nn.Parameter(torch.empty(hidden, c_out))
        self.b2 = nn.Parameter(torch.ones(c_out))
        self.register_buffer("threshold", torch.tensor(THRESHOLD_INIT))
        self.clamp_max = clamp_max
        self.reset("kaiming")

    def reset(self, init: str, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            for w in (self.w1, self.w2):  # Kaiming normal (fan in, ReLU gain), drawn from `generator`
                w.copy_(torch.randn(w.shape, generator=generator) * math.sqrt(2.0 / w.shape[0]))
            if init != "kaiming":  # identity, and l1 (which then spreads b2: `l1_start`)
                self.w2.zero_()
            self.b2.fill_(1.0)

    @property
    def macs(self) -> int:
        """MACs of the two FC layers (per sample)."""
        return self.w1.numel() + self.w2.numel()

    def forward(self, z: Tensor) -> Tensor:
        h = torch.mm(z.mean((2, 3)), self.w1).relu_()
        return torch.addmm(self.b2, h, self.w2).clamp_(0.0, self.clamp_max)


class GatedConv2d(DynamicModule, nn.Conv2d):
    """A conv with a ManiDP gate on its output channels; its input channels may be gated by `prev`.

    The mask is applied to the output of the conv's BatchNorm by a forward hook on that (unchanged) BatchNorm,
    which also pools the pre-mask feature for the manifold loss (`last_feature`, after a ReLU when
    `relu_feature`). The BatchNorm stays a plain nn.BatchNorm2d, so the model file's architecture and the
    state dict keys are those of the base model plus the gates. Records `last_saliency` and `last_mask` (N, C_out).
    """

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, hidden: int, clamp_max: float, prev: GatedConv2d | None) -> GatedConv2d:
        if conv.groups != 1:
            raise BadValue("ManiDP gates only ungrouped convs")
        new = conv_sharing_weights(conv, cls)
        new.gate = SaliencyGate(conv.in_channels, conv.out_channels, hidden, clamp_max).to(conv.weight)
        new._prev = (prev,) if prev is not None else ()  # a tuple: not a submodule, not in the state dict
        new.last_saliency = new.last_mask = new.last_kept = new.last_feature = None
        new.relu_feature, new.slice_misses = False, 0  # slice_misses: kept-set slices built (compact steps)
        return new

    def attach_norm(self, bn: nn.BatchNorm2d, relu_feature: bool) -> None:
        """Mask the output of `bn` (the BatchNorm after this conv) with this conv's mask."""
        self.relu_feature = relu_feature
        self._norm = (bn,)  # a tuple: not a submodule
        bn.register_forward_hook(self._mask_norm_output)

    def _mask_norm_output(self, bn: nn.Module, args, out: Tensor) -> Tensor:
        if self.training or torch.is_grad_enabled():  # the manifold loss's features (not needed to infer)
            self.last_feature = (F.relu(out) if self.relu_feature else out).mean((2, 3))
        mask = self.last_mask
        return out * mask.view(*mask.shape, 1, 1).to(out.dtype)

    @property
    def prev(self) -> GatedConv2d | None:
        return self._prev[0] if self._prev else None

    def forward(self, x: Tensor) -> Tensor:
        self.refuse_proxy(x)
        pi = self.gate(x)
        mask = torch.where(pi >= self.gate.threshold, pi, 0.0)
        self.last_saliency, self.last_mask, self.last_kept = pi, mask, None  # last_kept: compact steps only
        prev = self.prev
        in_mask = prev.last_mask if prev is not None else None
        y = super().forward(x)  # batch-1 inference skips channels one level up (GatedBlock, GatedFeatures)
        shape = (x.shape[1], x.shape[2] * x.shape[3], y.shape[2] * y.shape[3])
        self.record_lazy(lambda: self._costs(mask.detach(), in_mask, *shape))
        return y

    @property
    def last_mask(self) -> Tensor | None:
        """(N, C_out) the last forward's mask: pi where kept, else 0."""
        mask = self.__dict__.get("_last_mask")
        if callable(mask):
            mask = self.__dict__["_last_mask"] = mask()
        return mask

    @last_mask.setter
    def last_mask(self, mask: Tensor | None) -> None:
        self.__dict__["_last_mask"] = mask

    def last_keep(self) -> Tensor | None:
        """(N, C_out) bool: the channels the last forward kept (a kept channel of scale 0 counts as dropped)."""
        mask = self.last_mask
        return None if mask is None else mask > 0

    def folded(self, bn: nn.BatchNorm2d) -> Folded:
        """This conv's compact-inference state with `bn` (see `Folded`, `cached_fold`)."""
        gate = self.gate
        sources = (self.weight, self.bias, gate.threshold, gate.w1, gate.w2, gate.b2, bn.weight, bn.bias,
                   bn.running_mean, bn.running_var)  # fmt: skip
        return cached_fold(self, bn, sources, threshold=float(gate.threshold), w2=gate.w2.detach(),
                           b2=gate.b2.detach(), clamp_max=gate.clamp_max)  # fmt: skip

    def compact(self, x: Tensor, incoming: Kept | None, bn: nn.BatchNorm2d, relu: bool) -> tuple[Tensor, Kept]:
        """One batch-1 step on kept channels only: x (1, k_in, H, W) holds the input channels `incoming` (None: all);
        returns (y (1, k_out, H', W'), the kept output channels) with y = [ReLU](BN(conv(x))) * pi on those
        channels, BatchNorm folded into the conv. The gate pools x: the dropped input channels are zeros and pool
        to 0. The slices of the folded weights for a pair of kept sets are cached (`SLICE_CACHE_WEIGHTS` bounds
        them): trained gates choose from few sets (FMNIST ResNet-20: 2 to 18 per conv over 256 test images)."""
        f = self.folded(bn)
        in_key = None if incoming is None else incoming.key
        hw = x.shape[2] * x.shape[3]
        w1 = f.gate_inputs.get((in_key, hw))  # the gate's first layer on the kept inputs, divided by H W: sum-pooling
        if w1 is None:
            w1 = self.gate.w1 if incoming is None else self.gate.w1.index_select(0, incoming.index)
            w1 = f.gate_inputs[(in_key, hw)] = w1.detach() / hw
        h = torch.mm(x.sum((2, 3)), w1).relu_()
        pi = torch.addmm(f.b2, h, f.w2).clamp_(0.0, f.clamp_max)[0]  # (C_out,)
        keep = pi > 0 if f.threshold <= 0 else pi >= f.threshold  # a zero scale keeps nothing
        key = (in_key, keep.cpu().numpy().tobytes())
        entry = f.slices.get(key)
        if entry is None:
            entry = f.slice(torch.nonzero(keep).squeeze(1), incoming, key)
            self.__dict__["slice_misses"] += 1
        kept, w, b = entry
        if len(kept.index) and x.shape[1]:
            y = self._conv_forward(x, w, b)
        else:  # no output kept, or no input kept: then the conv sees zeros and outputs the (folded) BatchNorm shift
            y = b.view(1, -1, 1, 1).expand(1, len(kept.index), *self.output_size(x)).contiguous()
        if relu:  # relu(a) * s == relu(a * s) for s > 0: scale after the ReLU, as the masked BN output would be
            y = y.relu_()
        y = y.mul_(pi.index_select(0, kept.index).view(-1, 1, 1))
        # the same records as forward(); the mask and the MACs are built only when read, out of measured latency.
        # Written to __dict__: they are plain attributes, and nn.Module.__setattr__ costs microseconds each.
        prev, shape = self.prev, (self.in_channels, hw, y.shape[2] * y.shape[3])
        self.__dict__.update(
            last_saliency=pi[None], last_kept=kept.index,
            _last_mask=lambda: torch.zeros_like(pi).index_copy_(0, kept.index, pi.index_select(0, kept.index))[None],
            _record=lambda: self._costs(self.last_mask, prev.last_mask if prev is not None else None, *shape),
        )  # fmt: skip
        return y, kept

    def _costs(self, mask: Tensor, in_mask: Tensor | None, c_in: int, hw_in: int, hw_out: int):
        kept_out = (mask > 0).sum(1).cpu().to(torch.float64)
        kept_in = (
            (in_mask > 0).sum(1).cpu().to(torch.float64) if in_mask is not None else torch.full_like(kept_out, c_in)
        )
        # gate: pooling (C_in * H * W additions) + two FC layers; scaling: one product per kept output value
        overhead = float(c_in * hw_in + self.gate.macs) + kept_out * hw_out
        k = self.kernel_size[0] * self.kernel_size[1]
        return kept_in * kept_out * k * hw_out + overhead, overhead

    def output_size(self, x: Tensor) -> list[int]:
        """Spatial size (H', W') of this conv's output for input x (N, C, H, W)."""
        geometry = zip(x.shape[2:], self.padding, self.dilation, self.kernel_size, self.stride, strict=True)
        return [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in geometry]


class InputGatedConv2d(DynamicModule, nn.Conv2d):
    """A conv whose input channels a gated conv (`prev`) masks and whose output channels all stay: a residual
    block's last conv when the gates keep off the residual stream (`Site.gated` False, `--scope internal`). It has
    no gate; its executed MACs count the kept input channels, and batch-1 inference computes only those."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, prev: GatedConv2d) -> InputGatedConv2d:
        new = conv_sharing_weights(conv, cls)
        new._prev = (prev,)  # a tuple: not a submodule, not in the state dict
        return new

    prev = GatedConv2d.prev

    def forward(self, x: Tensor) -> Tensor:
        self.refuse_proxy(x)
        in_mask = self.prev.last_mask
        y = super().forward(x)
        hw_out = y.shape[2] * y.shape[3]
        self.record_lazy(lambda: self._costs(in_mask, hw_out))
        return y

    def compact(self, x: Tensor, incoming: Kept | None, bn: nn.BatchNorm2d, relu: bool) -> tuple[Tensor, Kept]:
        """As `GatedConv2d.compact`, keeping every output channel: y (1, C_out, H', W') from x (1, k_in, H, W)."""
        sources = (self.weight, self.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        f = cached_fold(self, bn, sources)
        key = (None if incoming is None else incoming.key, b"")
        entry = f.slices.get(key)
        if entry is None:
            entry = f.slice(torch.arange(self.out_channels, device=x.device), incoming, key)
        kept, w, b = entry
        if x.shape[1]:
            y = self._conv_forward(x, w, b)
        else:  # no input kept: the conv sees zeros and outputs the (folded) BatchNorm shift
            y = b.view(1, -1, 1, 1).expand(1, len(b), *GatedConv2d.output_size(self, x)).contiguous()
        if relu:
            y = y.relu_()
        prev, hw_out = self.prev, y.shape[2] * y.shape[3]
        self.__dict__["_record"] = lambda: self._costs(prev.last_mask, hw_out)
        return y, kept

    def _costs(self, in_mask: Tensor, hw_out: int) -> tuple[Tensor, Tensor]:
        kept_in = (in_mask > 0).sum(1).cpu().to(torch.float64)
        k = self.kernel_size[0] * self.kernel_size[1]
        return kept_in * self.out_channels * k * hw_out, torch.zeros_like(kept_in)


def cached_fold(conv: nn.Conv2d, bn: nn.BatchNorm2d, sources: tuple, **gate: Any) -> Folded:
    """`conv`'s compact-inference state with `bn` (see `Folded`; `gate`: its gate fields), built once and rebuilt
    (the slices dropped) when a tensor in `sources` is replaced or changed in place (training, load_state_dict, an
    edit)."""
    versions = tuple(-1 if t is None else t._version for t in sources)
    f = conv.__dict__.get("_folded")  # it holds the old sources, so `is` compares live objects only
    if f is None or f.versions != versions or any(a is not b for a, b in zip(f.sources, sources, strict=True)):
        f = conv.__dict__["_folded"] = Folded(sources, versions, *_fold(conv, bn), **gate)
    return f


def conv_sharing_weights(conv: nn.Conv2d, cls: type[nn.Conv2d] = nn.Conv2d) -> nn.Conv2d:
    """A `cls` with `conv`'s hyper-parameters whose weight and bias are `conv`'s own tensors (no copy): how a conv is
    wrapped in a gate, and unwrapped again."""
    new = cls(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
        bias=conv.bias is not None, padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype,
    )  # fmt: skip
    new.weight = conv.weight
    if conv.bias is not None:
        new.bias = conv.bias
    return new


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """conv -> eval BatchNorm as one conv: weight (C_out, C_in, kh, kw) and bias (C_out,), detached."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return (conv.weight * scale.view(-1, 1, 1, 1)).detach(), bias.detach()


def _compact_ok(x: object, module: nn.Module) -> bool:
    """Compact batch-1 inference applies: one real input, eval mode, no autograd (folded weights are detached), and
    not the channel analysis, which must see every channel."""
    return (
        isinstance(x, Tensor)
        and x.shape[0] == 1
        and not module.training
        and not torch.is_grad_enabled()
        and not analysing()
    )


class GatedBlock(nn.Module):
    """Mixed into a residual block whose two convs are GatedConv2d (`gated_block_class`; the block's `_compact` is
    its `BlockPlan`). Compact batch-1 inference (module docstring): only conv1's kept channels reach conv2, and
    conv2's kept outputs are added into the shortcut by index. Otherwise the block's own forward runs (gates and
    masks applied by the gated convs and their BatchNorm hooks)."""

    base_class: type[nn.Module]

    def forward(self, x: Tensor) -> Tensor:
        if not _compact_ok(x, self):
            return super().forward(x)
        plan: BlockPlan = self.__dict__["_compact"]
        shortcut = x if plan.shortcut is None else getattr(self, plan.shortcut)(x)
        y, k1 = getattr(self, plan.conv1).compact(x, None, getattr(self, plan.bn1), relu=True)
        z, k2 = getattr(self, plan.conv2).compact(y, k1, getattr(self, plan.bn2), relu=False)
        return shortcut.index_add(1, k2.index, z).relu_()


_GATED_BLOCKS: dict[type[nn.Module], type[GatedBlock]] = {}


def gated_block_class(cls: type[nn.Module]) -> type[GatedBlock]:
    """`Gated<cls>`: `cls` with GatedBlock's forward in front (same attributes and state dict), made once per class,
    so that any block class the sites recognise (prune-cli's BasicBlock, torchvision's) runs compact."""
    if cls not in _GATED_BLOCKS:
        attrs = {"base_class": cls, "__module__": __name__}
        _GATED_BLOCKS[cls] = type(f"Gated{cls.__name__}", (GatedBlock, cls), attrs)
    return _GATED_BLOCKS[cls]


class GatedFeatures(nn.Sequential):
    """VGG features with gated convs. Compact batch-1 inference: each gated conv -> BatchNorm -> ReLU runs as one
    folded conv on the kept channels, and the kept channels are carried through max-pools and ReLUs into the next
    gated conv (as `features_plan` checked); anywhere else, and at the end, the tensor is scattered to full width."""

    def forward(self, x: Tensor) -> Tensor:
        if not _compact_ok(x, self):
            return super().forward(x)
        layers, kept, i = list(self), None, 0
        while i < len(layers):
            m = layers[i]
            if isinstance(m, GatedConv2d):  # features_plan checked that its BatchNorm and a ReLU follow
                x, kept = m.compact(x, kept, layers[i + 1], relu=True)
                width = m.out_channels
                i += 3
                continue
            if kept is not None and not isinstance(m, (nn.MaxPool2d, nn.ReLU)):
                x, kept = _scatter(x, kept.index, width), None
            x = m(x)
            i += 1
        return x if kept is None else _scatter(x, kept.index, width)


def _scatter(x: Tensor, kept: Tensor, width: int) -> Tensor:
    """(1, k, H, W) holding channels `kept` -> (1, width, H, W) with zeros elsewhere."""
    return x.new_zeros(1, width, *x.shape[2:]).index_copy_(1, kept, x)


# ----------------------------------------------------------------------------------------------- wrapping
def hidden_width(c_out: int, squeeze_rate: int) -> int:
    return c_out if c_out < 80 else max(1, c_out // squeeze_rate)


def gated_layers(model: nn.Module) -> list[GatedConv2d]:
    """The gated convs in module order."""
    return [m for m in model.modules() if isinstance(m, GatedConv2d)]


def _install_compact(model: nn.Module, sites: list) -> None:
    """Give the blocks and plain Sequentials that `block_plan` / `features_plan` recognise their compact batch-1
    forward (a class swap: same modules and state dict)."""
    by_conv = {site.conv: site for site in sites}
    for name, m in list(model.named_modules()):
        if type(m) is nn.Sequential:
            if features_plan(m, by_conv, name):
                m.__class__ = GatedFeatures
            continue
        gated = {f"{name}.{c}".lstrip("."): c for c, _ in m.named_children()}  # full name -> attribute
        gated = {full: c for full, c in gated.items() if full in by_conv}
        for conv2, attr in gated.items():
            prev = by_conv[conv2].prev
            plan = block_plan(m, gated[prev], attr) if prev in gated else None
            if plan is not None:
                m.__class__ = gated_block_class(type(m))
                m.__dict__["_compact"] = plan
                break


@torch.no_grad()
def l1_start(model: nn.Module, spread: float) -> None:
    """gate_init=l1: each gate's b2 (the saliency of every input while w2 = 0) spans 1 -+ spread / 2 in the order of
    its conv's filter L1 norms, and the BatchNorm after it is divided by b2, so the model still computes the base's
    function and the schedule's first thresholds drop the channels L1 ranks last (what `l1` would remove)."""
    for conv in gated_layers(model):
        order = conv.weight.abs().sum((1, 2, 3)).argsort()
        rank = torch.empty_like(order, dtype=conv.gate.b2.dtype).index_copy_(
            0, order, torch.linspace(0, 1, len(order), dtype=conv.gate.b2.dtype, device=order.device)
        )
        b2 = 1 + spread * (rank - 0.5)
        conv.gate.b2.copy_(b2)
        bn = conv._norm[0]
        bn.weight.div_(b2)
        bn.bias.div_(b2)


def wrap(model: nn.Module, config: Mapping[str, Any], generator: torch.Generator | None = None) -> nn.Module:
    """Gate `model` in place as `config` says (squeeze_rate, clamp_max, gate_init; residual_gates: whether the convs
    whose channels feed a residual sum are gated, default true as in model files made before the key; `hidden`:
    {conv name: hidden width} for gates whose conv lost channels to `static_below`, which keep the hidden width they
    were trained with)."""
    squeeze, clamp_max = int(config.get("squeeze_rate", 2)), float(config.get("clamp_max", 1000.0))
    hidden = config.get("hidden") or {}
    sites = gate_sites(model, residual=bool(config.get("residual_gates", True)))
    if not any(site.gated for site in sites):
        raise BadValue("ManiDP found no conv to gate: it gates convs that a BatchNorm alone reads, after the stem")
    gated_convs: dict[str, GatedConv2d] = {}
    for site in sites:
        conv, bn = model.get_submodule(site.conv), model.get_submodule(site.bn)
        prev = gated_convs[site.prev] if site.prev is not None else None
        if site.gated:
            width = hidden.get(site.conv) or hidden_width(conv.out_channels, squeeze)
            new = gated_convs[site.conv] = GatedConv2d.from_conv(conv, int(width), clamp_max, prev)
            new.gate.reset(config.get("gate_init", "identity"), generator)
            new.attach_norm(bn, site.relu)
        else:
            new = InputGatedConv2d.from_conv(conv, prev)
        parent, _, attr = site.conv.rpartition(".")
        setattr(model.get_submodule(parent), attr, new)
    _install_compact(model, sites)
    return model


@register_criterion()
class ManiDP(DynamicCriterion):
    name = "manidp"
    paper = "2103.05861"
    needs = frozenset({"data", "labels", "train"})
    summary = "learned per-input channel gates with a manifold (similarity) regulariser (dynamic; trains)"

    @dataclass(frozen=True)
    class Options:
        remain: float | None = None  # target remain rate t; None: from --target-macs (static estimate)
        lambda_sparsity: float = 5e-3
        eta: float = 1.0  # weight of the manifold term
        gamma: float = 1.0
        thre_cls: float = 0.5
        squeeze_rate: int = 2
        clamp_max: float = 2.0  # saliencies lie in [0, clamp_max] (official 1000: unbounded in effect)
        gate_init: Literal["identity", "kaiming", "l1"] = "l1"
        l1_spread: float = 0.2  # gate_init=l1: b2 spans 1 -+ l1_spread / 2 in the order of the filters' L1 norms
        schedule: Literal["official", "ahead", "track", "ramp"] = "ramp"
        ramp_start: float = 0.0  # schedule=ramp: fractions of the training steps where the rate starts to fall...
        ramp_end: float = 0.3  # ...and where it reaches t (the rest trains at t)
        track_momentum: float = 0.9  # schedule=track: momentum of the per-step moving average of saliencies
        gate_lr: float = 30.0  # learning-rate multiplier of the gates (official: 1)
        static_below: float = 0.0  # after training, remove the channels fewer than this share of calib inputs keep
        manifold_grad: Literal["both", "gates"] = "gates"  # what the manifold term trains (official: both)
        bn_refresh: bool = True  # re-estimate BatchNorm statistics on the calibration images after training
        fit_thresholds: bool = True  # after training, thresholds re-set in eval mode to meet the target (calib)
        refit_at_ramp_end: bool = True  # schedule=ramp: when the ramp ends, the rate that meets it in eval mode

    def run(self, ctx: Context) -> Dynamic:
        o = self.options
        if o.remain is not None and not 0 < o.remain <= 1:
            raise BadValue(f"manidp remain must be in (0, 1], got {o.remain}")
        if o.squeeze_rate < 1 or o.clamp_max <= 0 or o.thre_cls <= 0:
            raise BadValue("manidp squeeze-rate must be >= 1, clamp-max and thre-cls > 0")
        if not 0 <= o.track_momentum < 1:
            raise BadValue(f"manidp track-momentum must be in [0, 1), got {o.track_momentum}")
        if not 0 <= o.ramp_start < o.ramp_end <= 1:
            raise BadValue(f"manidp needs 0 <= ramp-start < ramp-end <= 1, got {o.ramp_start}, {o.ramp_end}")
        if not 0 <= o.l1_spread < 2:  # b2 must stay positive: the BatchNorm is divided by it
            raise BadValue(f"manidp l1-spread must be in [0, 2), got {o.l1_spread}")
        if not 0 <= o.static_below <= 1 or not o.gate_lr > 0:
            raise BadValue(f"manidp static-below must be in [0, 1] and gate-lr > 0, got {o.static_below}, {o.gate_lr}")
        # The selection scope decides, as for every criterion, whether channels of the residual stream may go:
        # `internal` (the default) leaves the blocks' last convs' outputs whole.
        config = {"criterion": self.name, "squeeze_rate": o.squeeze_rate, "clamp_max": o.clamp_max,
                  "gate_init": o.gate_init, "residual_gates": any(g.residual for g in ctx.groups)}  # fmt: skip
        model = wrap(copy.deepcopy(ctx.model), config, ctx.generator(salt=31)).to(ctx.device).eval()
        if o.gate_init == "l1":
            l1_start(model, o.l1_spread)
        if o.remain is not None:
            remain = o.remain
        elif ctx.target.metric == "macs":
            remain = estimate_remain(ctx.model, model, ctx.example_input, ctx.target.keep)
        else:
            raise BadValue("manidp reduces MACs per input, not parameters: use --target-macs or set remain")
        complexity = o.thre_cls * _mean_ce(model, ctx)
        hooks = ManiDPHooks(remain, o.lambda_sparsity, o.eta, o.gamma, o.thre_cls, complexity,
                            ahead=o.schedule in ("ahead", "track"),
                            track_momentum=o.track_momentum if o.schedule in ("track", "ramp") else None,
                            gate_lr=o.gate_lr, log=ctx.log,
                            detach_features=o.manifold_grad == "gates",
                            ramp=(o.ramp_start, o.ramp_end) if o.schedule == "ramp" else None,
                            bn_images=ctx.require_calib().x.to(ctx.device) if o.bn_refresh else None,
                            fit=_fitter(ctx, remain, o) if o.fit_thresholds or o.refit_at_ramp_end else None,
                            final_fit=o.fit_thresholds, refit_at_ramp_end=o.refit_at_ramp_end)  # fmt: skip
        n_gated = len(gated_layers(model))
        ctx.log(f"manidp: {n_gated} gated convs, target remain rate {remain:.3f}, C = {complexity:.4f}")
        extra = {"remain": remain, "complexity": complexity}
        if o.static_below > 0:
            extra["finalize"] = functools.partial(_finalize, ctx=ctx, below=o.static_below, config=config)
        return Dynamic(model=model, hooks=hooks, config=config, extra=extra)

    @classmethod
    def rebuild(cls, model: nn.Module, config: dict[str, Any]) -> nn.Module:
        """Gate a freshly built base model as `config` says; gates and thresholds come with the state dict."""
        return wrap(model, config)


def _fitter(ctx: Context, remain: float, o: ManiDP.Options):
    """The eval-mode threshold fit (`ManiDPHooks.fit`, returning the rate it set): to the MACs target when it comes
    from --target-macs, else at the `remain` rate; on at most `FIT_IMAGES` calibration images."""
    images = ctx.require_calib().x[:FIT_IMAGES].to(ctx.device)
    if o.remain is not None:

        def at_rate(model: nn.Module) -> float:
            fit_thresholds(model, images, remain)
            return remain

        return at_rate
    budget = ctx.target.keep * float(per_input_macs(ctx.model, ctx.example_input[:1])[0][0])

    def fit(model: nn.Module) -> float:
        rate, macs = fit_to_macs(model, images, budget)
        ctx.log(f"manidp: eval-mode thresholds at rate {rate:.3f}: {macs / budget * ctx.target.keep:.3f} of the "
                f"base's MACs per calibration input (target {ctx.target.keep:.3f})")  # fmt: skip
        return rate

    return fit


def _finalize(model: nn.Module, ctx: Context, below: float, config: dict) -> tuple[nn.Module, dict[str, Any]]:
    """After training: (model with the channels that fewer than `below` of the calibration inputs keep removed
    physically, {"model": its plain static copy, removed channels, static MACs and params}); see `static`."""
    from criteria.manidp.static import to_static

    new, static, report = to_static(model, ctx.require_calib().x.to(ctx.device), below, ctx.example_input, config)
    ctx.log(f"manidp: static_below={below}: {report['removed_channels']} of {report['gated_channels']} gated "
            "channels removed physically")  # fmt: skip
    return new, {"model": static, **report}


@torch.no_grad()
def _mean_ce(model: nn.Module, ctx: Context) -> float:
    calib = ctx.require_calib()
    total, n = 0.0, 0
    for x, y in calib.batches(256):
        logits = model(x.to(ctx.device))
        total += float(F.cross_entropy(logits.float(), y.to(ctx.device), reduction="sum"))
        n += len(y)
    return total / max(n, 1)
