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
        new = resized(m, len(out_idx), len(out_idx), groups=len(out_idx))
        in_idx = torch.arange(1)
    else:
        in_idx = _idx(in_mask, m.in_channels)
        new = resized(m, len(in_idx), len(out_idx))
    with torch.no_grad():
        new.weight.copy_(m.weight[out_idx][:, in_idx])
        if m.bias is not None:
            new.bias.copy_(m.bias[out_idx])
    return new.to(m.weight.device, m.weight.dtype).train(m.training)


def _linear(m: nn.Linear, out_mask: Tensor | None, in_mask: Tensor | None) -> nn.Linear:
    out_idx, in_idx = _idx(out_mask, m.out_features), _idx(in_mask, m.in_features)
    new = resized(m, len(in_idx), len(out_idx))
    with torch.no_grad():
        new.weight.copy_(m.weight[out_idx][:, in_idx])
        if m.bias is not None:
            new.bias.copy_(m.bias[out_idx])
    return new.to(m.weight.device, m.weight.dtype).train(m.training)


def _bn(m: nn.BatchNorm1d | nn.BatchNorm2d, out_mask: Tensor | None, in_mask: Tensor | None) -> nn.Module:
    idx = _idx(out_mask, m.num_features)
    new = resized(m, len(idx), len(idx))
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            src = getattr(m, name)
            if src is not None:
                getattr(new, name).copy_(src[idx])
        if m.num_batches_tracked is not None:
            new.num_batches_tracked.copy_(m.num_batches_tracked)
    device = m.running_mean.device if m.running_mean is not None else m.weight.device
    return new.to(device).train(m.training)


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
