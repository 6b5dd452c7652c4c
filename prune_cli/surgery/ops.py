"""Per-layer prune functions, one per module type, in one table: each gives the kept slices of a module's tensors
(weights, bias, BatchNorm's four buffers) and its new channel sizes. `apply.prune` hands the slices to its copy of
the model, so that the shrunk layer is a copy of the old one (hooks and any extra attribute included) with smaller
tensors, never rebuilt by its constructor."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from prune_cli.errors import UnsupportedGraph

Shrunk = tuple[dict[str, Tensor], dict[str, int]]  # tensor name -> kept slice, size attribute -> new size


def _conv(m: nn.Conv2d, out_idx: Tensor | None, in_idx: Tensor | None) -> Shrunk:
    if m.groups == m.in_channels == m.out_channels and m.groups > 1:  # depthwise: one index for in and out
        k = m.out_channels if out_idx is None else len(out_idx)
        return _kept(m, {"weight": (out_idx, None), "bias": (out_idx, None)}), {
            "in_channels": k, "out_channels": k, "groups": k}  # fmt: skip
    sizes = {"in_channels": _size(in_idx, m.in_channels), "out_channels": _size(out_idx, m.out_channels)}
    return _kept(m, {"weight": (out_idx, in_idx), "bias": (out_idx, None)}), sizes


def _linear(m: nn.Linear, out_idx: Tensor | None, in_idx: Tensor | None) -> Shrunk:
    sizes = {"in_features": _size(in_idx, m.in_features), "out_features": _size(out_idx, m.out_features)}
    return _kept(m, {"weight": (out_idx, in_idx), "bias": (out_idx, None)}), sizes


def _bn(m: nn.BatchNorm1d | nn.BatchNorm2d, idx: Tensor | None, in_idx: Tensor | None) -> Shrunk:
    names = ("weight", "bias", "running_mean", "running_var")
    return _kept(m, {name: (idx, None) for name in names}), {"num_features": _size(idx, m.num_features)}


def _kept(m: nn.Module, cuts: dict[str, tuple[Tensor | None, Tensor | None]]) -> dict[str, Tensor]:
    """The kept (rows, columns) slice of each tensor of `m` named in `cuts` (None keeps that dimension), on its
    device and dtype, a Parameter where the original is one (same requires_grad)."""
    out = {}
    for name, (rows, cols) in cuts.items():
        src = getattr(m, name)
        if src is None:
            continue
        value = src.detach()
        if rows is not None and cols is not None and value[0, 0].numel() >= 9 and value.numel() >= 1 << 16:
            # One pass, no intermediate: the kept (row, column) kernels of a large conv as rows of a 2-D view, one
            # index_select: faster than two index_selects or an advanced-index gather on large weights (readings in
            # benchmarks/README.md). For 1x1 kernels the rows would be single numbers, so those take the two
            # index_selects below.
            rows, cols = rows.to(src.device), cols.to(src.device)
            flat = (rows[:, None] * value.shape[1] + cols).reshape(-1)
            value = value.reshape(value.shape[0] * value.shape[1], -1).index_select(0, flat)
            value = value.reshape(len(rows), len(cols), *src.shape[2:])
        else:
            if rows is not None:
                value = value.index_select(0, rows.to(src.device))
            if cols is not None:
                value = value.index_select(1, cols.to(src.device))
        if rows is None and cols is None:
            value = value.clone()  # an uncut tensor (a bias when only inputs go): the copy must own it
        out[name] = nn.Parameter(value, requires_grad=src.requires_grad) if isinstance(src, nn.Parameter) else value
    return out


SHRINK: dict[type[nn.Module], Callable[[nn.Module, Tensor | None, Tensor | None], Shrunk]] = {
    nn.Conv2d: _conv,
    nn.Linear: _linear,
    nn.BatchNorm1d: _bn,
    nn.BatchNorm2d: _bn,
}


def shrink(m: nn.Module, out_idx: Tensor | None, in_idx: Tensor | None) -> Shrunk:
    """The kept slices of `m`'s tensors and its new sizes, keeping positions `out_idx` / `in_idx` (sorted int64;
    None keeps the dimension)."""
    fn = SHRINK.get(type(m))
    if fn is None:
        raise UnsupportedGraph(f"no prune function for layers of type {type(m).__name__}")
    return fn(m, out_idx, in_idx)


def dim_size(m: nn.Module, dim: str) -> int:
    """Size of the "out" or "in" channel dimension of a conv, linear or BatchNorm layer."""
    if isinstance(m, nn.Conv2d):
        return m.out_channels if dim == "out" else m.in_channels
    if isinstance(m, nn.Linear):
        return m.out_features if dim == "out" else m.in_features
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return m.num_features
    raise UnsupportedGraph(f"no prune function for layers of type {type(m).__name__}")


def _size(idx: Tensor | None, size: int) -> int:
    return size if idx is None else len(idx)
