"""Dynamic (input-dependent) models: the per-input cost protocol shared by HASTE and ManiDP.

A dynamic module subclasses `DynamicModule` and, on every forward over a batch of N inputs, records

    last_macs      (N,) float64  MACs it executed for each sample, its own overhead included
    last_overhead  (N,) float64  the part of `last_macs` that is the method's overhead (hashing, merging, gates)

`input_dependence(model, x)` reads, for modules that keep a subset of their channels per input (`last_keep`), how
much that subset depends on the input: per module the share of channels kept by some inputs and dropped by others,
and the mean Jaccard distance between two inputs' kept sets.

`per_input_macs(model, x)` runs one forward and adds, per sample, the dynamic modules' records to the static MACs
of every other Conv/Linear layer (the ones not inside a dynamic module). Static MACs follow `metrics.count_macs`:
conv and linear multiply-accumulates only (flop_counter FLOPs / 2, no bias, no BatchNorm). A method counts an
addition (hashing, merging, pooling) or a scaling multiplication of its overhead as one MAC.

fx: a dynamic module's forward has data-dependent control flow, so tracers must treat it as a leaf.
- Every DynamicModule subclass registers itself (`__init_subclass__`) with the surgery tracer's leaf list. The
  dynamic modules of prune-cli subclass nn.Conv2d or nn.BatchNorm2d, so surgery reads them as the conv/BN they
  extend (same weights, same channels) and channel groups of a dynamic model equal those of its base.
- The project's one fx trace (`prune_cli.api.graph.trace`) keeps every DynamicModule as a `call_module` leaf.
- `torch.fx.symbolic_trace` with its default tracer enters modules defined outside torch.nn; a dynamic module
  then refuses with UnsupportedGraph (naming the tracer to use) instead of failing inside fx.
- `analysing()` is true while the channel analysis runs a model: a dynamic module with a faster path for real
  inputs (one that computes fewer channels) takes its reference path then, whose channels the analysis must see.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import ClassVar

import torch
from torch import Tensor, fx, nn

from prune_cli.errors import UnsupportedGraph
from prune_cli.surgery.graph import analysing as analysing  # re-exported: see `DynamicModule` users
from prune_cli.surgery.graph import register_pass_through_leaf
from prune_cli.surgery.split import register_trace_leaf

_STATIC = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class DynamicModule(nn.Module):
    """Base (mixin) of modules whose cost depends on the input. Put it first in the bases:
    `class HashConv2d(DynamicModule, nn.Conv2d)`. In forward, subclasses call `self.record(macs, overhead)` or,
    to keep the accounting out of measured latency, `self.record_lazy(fn)` with `fn() -> (macs, overhead)`
    evaluated when `last_macs` / `last_overhead` is first read."""

    # False: surgery's channel analysis looks inside the class rather than reading it as its base class (e.g. a
    # module that changes channels in a way its base class does not); it stays an fx leaf of `graph.trace`.
    surgery_leaf: ClassVar[bool] = True
    _record: tuple[Tensor, Tensor] | Callable[[], tuple[Tensor, Tensor]] | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.surgery_leaf:
            register_pass_through_leaf(cls)

    def record(self, macs: Tensor, overhead: Tensor) -> None:
        """Store this forward's per-sample MACs (overhead included) and overhead, both (N,)."""
        self._record = (macs.detach().cpu().to(torch.float64), overhead.detach().cpu().to(torch.float64))

    def record_lazy(self, fn: Callable[[], tuple[Tensor, Tensor]]) -> None:
        self._record = fn

    def clear_record(self) -> None:
        self._record = None

    def last_keep(self) -> Tensor | None:
        """(N, C) bool: which of its output channels the last forward kept for each sample, for modules that choose
        channels per input (ManiDP's gates); None for the others (HASTE merges rather than drops channels)."""
        return None

    def _resolved(self) -> tuple[Tensor, Tensor] | None:
        if callable(self._record):
            self.record(*self._record())
        return self._record

    @property
    def last_macs(self) -> Tensor | None:
        """(N,) float64 MACs of the last forward per sample, overhead included (None before any forward)."""
        r = self._resolved()
        return None if r is None else r[0]

    @property
    def last_overhead(self) -> Tensor | None:
        """(N,) float64 overhead MACs of the last forward per sample (hashing, merging, gates)."""
        r = self._resolved()
        return None if r is None else r[1]

    def refuse_proxy(self, x) -> None:
        """Raise a clear error when a tracer enters this module instead of keeping it as a leaf."""
        if isinstance(x, fx.Proxy):
            raise UnsupportedGraph(
                f"{type(self).__name__} is input-dependent and must be an fx leaf: trace with "
                "prune_cli.api.graph.trace instead of torch.fx.symbolic_trace"
            )


register_trace_leaf(DynamicModule)  # the one fx trace keeps every dynamic module as a leaf


def dynamic_modules(model: nn.Module) -> Iterator[tuple[str, DynamicModule]]:
    for name, m in model.named_modules():
        if isinstance(m, DynamicModule):
            yield name, m


def is_dynamic(model: nn.Module) -> bool:
    """True if any submodule of `model` is a DynamicModule."""
    return any(True for _ in dynamic_modules(model))


def _static_layers(model: nn.Module) -> list[nn.Module]:
    """Conv/Linear modules that are neither dynamic nor inside a dynamic module."""
    inside: set[int] = set()
    for _, d in dynamic_modules(model):
        inside.update(id(m) for m in d.modules())
    return [m for m in model.modules() if isinstance(m, _STATIC) and id(m) not in inside]


def _static_macs(module: nn.Module, output: Tensor) -> int:
    """MACs per sample of one conv/linear call, from its output shape (the flop_counter convention)."""
    per_sample_out = output[0].numel()
    if isinstance(module, nn.Linear):
        return per_sample_out * module.in_features
    k = 1
    for s in module.kernel_size:
        k *= s
    return per_sample_out * (module.in_channels // module.groups) * k


@torch.no_grad()
def per_input_macs(model: nn.Module, x: Tensor, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """MACs executed per input for the batch `x`: (total (N,), overhead (N,)), float64 on the CPU.

    One forward in eval mode (in chunks of `batch_size`): dynamic modules' records plus the static conv/linear
    MACs of all other conv/linear layers. Works for static models too (then overhead is zero).
    """
    _, total, overhead = forward_with_macs(model, x, batch_size)
    return total, overhead


@torch.no_grad()
def forward_with_macs(model: nn.Module, x: Tensor, batch_size: int = 256) -> tuple[Tensor, Tensor, Tensor]:
    """(outputs, total MACs (N,), overhead MACs (N,)) of one eval-mode forward over `x` in chunks."""
    was_training = model.training
    model.eval()
    static = _static_layers(model)
    dyn = [m for _, m in dynamic_modules(model)]
    counts: list[int] = []

    def hook(module, _args, output):
        counts.append(_static_macs(module, output))

    handles = [m.register_forward_hook(hook) for m in static]
    outputs, totals, overheads = [], [], []
    try:
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size]
            n = len(xb)
            counts.clear()
            for m in dyn:
                m.clear_record()
            outputs.append(model(xb))
            total = torch.full((n,), float(sum(counts)), dtype=torch.float64)
            overhead = torch.zeros(n, dtype=torch.float64)
            for m in dyn:
                if m.last_macs is None:  # not called in this forward (an unused branch)
                    continue
                total += m.last_macs.cpu()
                overhead += m.last_overhead.cpu()
            totals.append(total)
            overheads.append(overhead)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return torch.cat(outputs), torch.cat(totals), torch.cat(overheads)


def keep_stats(keep: Tensor) -> dict[str, float]:
    """Input dependence of one layer's keep decisions `keep` (N, C) bool, N >= 2 inputs:
    `varying`: share of channels kept by some inputs and dropped by others; `jaccard`: mean over the N(N-1)/2
    pairs of inputs of the Jaccard distance 1 - |A & B| / |A | B| between their kept sets (0 when both are empty);
    `kept`: mean share of channels kept; `always` / `never`: shares of channels every input keeps / none keeps."""
    m = keep.to(torch.float64)
    n, c = m.shape
    freq = m.mean(0)
    inter = m @ m.t()
    sizes = m.sum(1)
    union = sizes[:, None] + sizes[None, :] - inter
    distance = torch.where(union > 0, 1 - inter / union.clamp_min(1), torch.zeros_like(union))
    pairs = n * (n - 1) / 2
    return {
        "varying": float(((freq > 0) & (freq < 1)).sum()) / c,
        "jaccard": float(distance.triu(1).sum()) / pairs if pairs else 0.0,
        "kept": float(freq.mean()),
        "always": float((freq == 1).sum()) / c,
        "never": float((freq == 0).sum()) / c,
    }


@torch.no_grad()
def keep_masks(model: nn.Module, x: Tensor, batch_size: int = 256) -> dict[str, Tensor]:
    """{module name: (N, C) bool} the channels each dynamic module that chooses channels (`last_keep`) kept for each
    input of `x`, from eval-mode forwards in chunks of `batch_size` (at least 2: batch 1 may take another path)."""
    was_training = model.training
    model.eval()
    chosen = [(n, m) for n, m in dynamic_modules(model)]
    out: dict[str, list[Tensor]] = {}
    try:
        for i in range(0, len(x), max(2, batch_size)):
            model(x[i : i + max(2, batch_size)])
            for name, m in chosen:
                keep = m.last_keep()
                if keep is not None:
                    out.setdefault(name, []).append(keep.detach().cpu().bool())
    finally:
        model.train(was_training)
    return {name: torch.cat(parts) for name, parts in out.items()}


def input_dependence(model: nn.Module, x: Tensor, batch_size: int = 256) -> dict[str, dict[str, float]]:
    """Per dynamic module that chooses channels: `keep_stats` of its keep decisions over the inputs `x` (N >= 2);
    empty for static models and for methods that do not drop channels."""
    if len(x) < 2:
        raise ValueError("input dependence needs at least two inputs")
    return {name: keep_stats(keep) for name, keep in keep_masks(model, x, batch_size).items()}


def summarise_dependence(layers: dict[str, dict[str, float]]) -> dict[str, float]:
    """Means over layers of `input_dependence`'s figures (empty dict for none)."""
    if not layers:
        return {}
    keys = next(iter(layers.values())).keys()
    return {k: sum(v[k] for v in layers.values()) / len(layers) for k in keys}
