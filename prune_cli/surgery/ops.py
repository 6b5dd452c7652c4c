"""Per-layer prune functions, one per module type, in one table: each builds a NEW module of the same type and
hyper-parameters from the kept slices of the old one (weights, bias, BatchNorm's four buffers)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from prune_cli.errors import UnsupportedGraph
from prune_cli.modelfile import resized


def _conv(m: nn.Conv2d, out_mask: Tensor | None, in_mask: Tensor | None) -> nn.Conv2d:
    out_idx = _idx(out_mask, m.out_channels)
    if m.groups == m.in_channels == m.out_channels and m.groups > 1:  # depthwise: one mask for in and out
        new = resized(m, len(out_idx), len(out_idx), groups=len(out_idx), device="meta")
        in_idx = None
    else:
        in_idx = _idx(in_mask, m.in_channels)
        new = resized(m, len(in_idx), len(out_idx), device="meta")
    _take(new, m, "weight", out_idx, in_idx)
    _take(new, m, "bias", out_idx)
    return new.train(m.training)


def _linear(m: nn.Linear, out_mask: Tensor | None, in_mask: Tensor | None) -> nn.Linear:
    out_idx, in_idx = _idx(out_mask, m.out_features), _idx(in_mask, m.in_features)
    new = resized(m, len(in_idx), len(out_idx), device="meta")
    _take(new, m, "weight", out_idx, in_idx)
    _take(new, m, "bias", out_idx)
    return new.train(m.training)


def _bn(m: nn.BatchNorm1d | nn.BatchNorm2d, out_mask: Tensor | None, in_mask: Tensor | None) -> nn.Module:
    idx = _idx(out_mask, m.num_features)
    new = resized(m, len(idx), len(idx), device="meta")
    for name in ("weight", "bias", "running_mean", "running_var"):
        _take(new, m, name, idx)
    if m.num_batches_tracked is not None:
        new.num_batches_tracked = m.num_batches_tracked.clone()
    return new.train(m.training)


def _take(new: nn.Module, old: nn.Module, name: str, rows: Tensor, cols: Tensor | None = None) -> None:
    """Give `new` (built on the meta device: no memory, no initialisation) the kept slice of `old`'s tensor `name`,
    on `old`'s device and dtype, as a parameter or buffer like the original."""
    src = getattr(old, name)
    if src is None:
        return
    value = src.detach().index_select(0, rows.to(src.device))
    if cols is not None:
        value = value.index_select(1, cols.to(src.device))
    if isinstance(src, nn.Parameter):
        value = nn.Parameter(value, requires_grad=src.requires_grad)
    setattr(new, name, value)


SHRINK: dict[type[nn.Module], Callable[[nn.Module, Tensor | None, Tensor | None], nn.Module]] = {
    nn.Conv2d: _conv,
    nn.Linear: _linear,
    nn.BatchNorm1d: _bn,
    nn.BatchNorm2d: _bn,
}


def shrink(m: nn.Module, out_mask: Tensor | None, in_mask: Tensor | None) -> nn.Module:
    """A smaller copy of `m` keeping the True positions of `out_mask` / `in_mask` (None keeps the dimension)."""
    fn = SHRINK.get(type(m))
    if fn is None:
        raise UnsupportedGraph(f"no prune function for layers of type {type(m).__name__}")
    return fn(m, out_mask, in_mask)


def dim_size(m: nn.Module, dim: str) -> int:
    """Size of the "out" or "in" channel dimension of a conv, linear or BatchNorm layer."""
    if isinstance(m, nn.Conv2d):
        return m.out_channels if dim == "out" else m.in_channels
    if isinstance(m, nn.Linear):
        return m.out_features if dim == "out" else m.in_features
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return m.num_features
    raise UnsupportedGraph(f"no prune function for layers of type {type(m).__name__}")


def _idx(mask: Tensor | None, size: int) -> Tensor:
    return torch.arange(size) if mask is None else mask.nonzero().flatten()
