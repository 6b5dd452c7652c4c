"""Dynamic (input-dependent) models: the per-input cost protocol shared by HASTE and ManiDP.

A dynamic module subclasses `DynamicModule` and, on every forward over a batch of N inputs, records

    last_macs      (N,) float64  MACs it executed for each sample, its own overhead included
    last_overhead  (N,) float64  the part of `last_macs` that is the method's overhead (hashing, merging, gates)

`per_input_macs(model, x)` runs one forward and adds, per sample, the dynamic modules' records to the static MACs
of every other Conv/Linear layer (the ones not inside a dynamic module). Static MACs follow `metrics.count_macs`:
conv and linear multiply-accumulates only (flop_counter FLOPs / 2, no bias, no BatchNorm). A method counts an
addition (hashing, merging, pooling) or a scaling multiplication of its overhead as one MAC.

fx: a dynamic module's forward has data-dependent control flow, so tracers must treat it as a leaf.
- Every DynamicModule subclass registers itself (`__init_subclass__`) with the surgery tracer's leaf list. The
  dynamic modules of prune-cli subclass nn.Conv2d or nn.BatchNorm2d, so surgery reads them as the conv/BN they
  extend (same weights, same channels) and channel groups of a dynamic model equal those of its base.
- `DynamicTracer` / `trace(model)` here is a plain `torch.fx.Tracer` that keeps DynamicModules as leaves.
- `torch.fx.symbolic_trace` with its default tracer enters modules defined outside torch.nn; a dynamic module
  then refuses with UnsupportedGraph (naming the tracer to use) instead of failing inside fx.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import ClassVar

import torch
from torch import Tensor, fx, nn

from prune_cli.errors import UnsupportedGraph
from prune_cli.surgery.graph import register_pass_through_leaf

_STATIC = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class DynamicModule(nn.Module):
    """Base (mixin) of modules whose cost depends on the input. Put it first in the bases:
    `class HashConv2d(DynamicModule, nn.Conv2d)`. In forward, subclasses call `self.record(macs, overhead)` or,
    to keep the accounting out of measured latency, `self.record_lazy(fn)` with `fn() -> (macs, overhead)`
    evaluated when `last_macs` / `last_overhead` is first read."""

    # False: surgery's channel analysis looks inside the class rather than reading it as its base class (e.g. a
    # module that changes channels in a way its base class does not); it stays an fx leaf for `DynamicTracer`.
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
                "prune_cli.dynamic.trace (or DynamicTracer) instead of torch.fx.symbolic_trace"
            )


class DynamicTracer(fx.Tracer):
    """An fx tracer that keeps every DynamicModule as a `call_module` leaf."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, DynamicModule) or super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> fx.GraphModule:
    """`torch.fx.symbolic_trace` with dynamic modules as leaves."""
    return fx.GraphModule(model, DynamicTracer().trace(model))


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
