"""Physical removal: keep-plan -> a new, smaller model with the same module names.

For every module a removal touches, the kept positions per dimension ("out", "in") come from the groups' members
(offsets for concatenation, `expand` for flatten -> Linear), then the copy of the module gets its kept slices
from the per-type function in `ops.py`. The original model is never modified.
"""

from __future__ import annotations

import copy
import functools
from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from prune_cli.api import ChannelGroup, Member
from prune_cli.errors import PruneCliError, UnsupportedGraph
from prune_cli.surgery import ops
from prune_cli.surgery.graph import channel_groups

# Which dimension of a module each member kind cuts.
_DIMS = {"conv_out": ("out",), "linear_out": ("out",), "bn": ("out",), "conv_in": ("in",), "linear_in": ("in",),
         "depthwise": ("out", "in")}  # fmt: skip


def validate_keep(groups: list[ChannelGroup], keep: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Check a keep-plan against the groups; return it with int64 CPU indices."""
    by_id = {g.id: g for g in groups}
    out = {}
    for gid, idx in keep.items():
        g = by_id.get(gid)
        if g is None:
            raise PruneCliError(f"keep-plan names unknown channel group {gid!r}")
        idx = torch.as_tensor(idx).to("cpu", torch.int64).flatten()
        if idx.numel() == g.size and bool((idx == torch.arange(g.size)).all()):
            continue  # keeps everything: nothing to do, allowed even for non-prunable groups
        if not g.prunable:
            raise PruneCliError(f"channel group {gid!r} is not prunable (image input, classifier output or grouped)")
        if idx.numel() == 0:
            raise PruneCliError(f"keep-plan for group {gid!r} keeps no channel; at least one must stay")
        if int(idx.min()) < 0 or int(idx.max()) >= g.size:
            raise PruneCliError(f"keep-plan for group {gid!r} has indices outside [0, {g.size})")
        if not bool((idx[1:] > idx[:-1]).all()):
            raise PruneCliError(f"keep-plan for group {gid!r} must hold sorted, unique indices")
        out[gid] = idx
    return out


def kept_positions(
    groups: list[ChannelGroup], keep: Mapping[str, Tensor], modules: Mapping[str, nn.Module]
) -> dict[tuple[str, str], Tensor]:
    """(module name, "out"|"in") -> sorted positions kept along that dimension, for every touched module
    (`modules`: the model's named modules). A dimension that one group covers exactly (no concatenation offset, no
    flatten expansion: nearly all of them) keeps that group's indices as they are; any other is built as a mask."""
    touches: dict[tuple[str, str], list[tuple[Member, ChannelGroup]]] = {}
    by_id = {g.id: g for g in groups}
    for gid in keep:
        for m in by_id[gid].members:
            for dim in _DIMS[m.kind]:
                touches.setdefault((m.module, dim), []).append((m, by_id[gid]))
    kept = {}
    for (module, dim), pairs in touches.items():
        size = ops.dim_size(modules[module], dim)
        (m, g), *more = pairs
        if not more and m.offset == 0 and m.expand == 1 and g.size == size:
            kept[module, dim] = keep[g.id]
            continue
        mask = torch.ones(size, dtype=torch.bool)
        for m, g in pairs:
            removed = torch.ones(g.size, dtype=torch.bool)
            removed[keep[g.id]] = False
            gone = removed.nonzero().flatten()
            # channel c owns positions offset + c*expand ... offset + (c+1)*expand - 1 of this dimension
            pos = gone if m.expand == 1 else (gone[:, None] * m.expand + torch.arange(m.expand)).flatten()
            mask[pos + m.offset] = False
        kept[module, dim] = mask.nonzero().flatten()
    return kept


def prune(
    model: nn.Module,
    example_input: Tensor,
    keep: Mapping[str, Tensor],
    overrides: Mapping[str, Tensor] | None = None,
    groups: list[ChannelGroup] | None = None,
) -> nn.Module:
    """A physically smaller copy of `model` keeping, for each group id in `keep`, the given channel indices.

    Groups not named keep all channels. `overrides` replaces parameters/buffers of the pruned model by name
    (shapes must match). Module names are preserved; `model` is untouched.
    """
    groups = groups if groups is not None else channel_groups(model, example_input)
    keep = validate_keep(groups, keep)
    modules = dict(model.named_modules())
    kept = kept_positions(groups, keep, modules)
    # The copy takes the kept slices in place of the touched layers' tensors (the memo maps each old tensor to its
    # slice): nothing is copied that is replaced right after, and no layer is rebuilt by its constructor.
    memo: dict[int, object] = {}
    sizes = {}
    for name in sorted({name for name, _ in kept}):
        old = modules[name]
        tensors, sizes[name] = ops.shrink(old, kept.get((name, "out")), kept.get((name, "in")))
        for attr, value in tensors.items():
            key = id(getattr(old, attr))
            if key in memo:
                raise UnsupportedGraph(f"{name}.{attr} is shared with another layer; tied weights cannot be pruned")
            memo[key] = value
    new = copy_module(model, memo)
    for name, attrs in sizes.items():
        module = memo[id(modules[name])]
        for attr, value in attrs.items():
            setattr(module, attr, value)
    if overrides:
        apply_overrides(new, overrides)
    return new


_ATOMIC = (int, float, bool, complex, str, bytes, type(None), torch.dtype, torch.device, torch.layout)
_EMPTY_COPYABLE = (dict, OrderedDict, set, list)


def copy_module(module: nn.Module, memo: dict[int, object]) -> nn.Module:
    """`copy.deepcopy(module, memo)` in a fraction of the time (benchmarks/README.md). deepcopy walks every
    hook dict and tuple of every layer through its generic protocol; here a module's state is rebuilt directly: its
    children copied the same way, its parameters and buffers cloned (or taken from `memo`), atomic values shared,
    empty containers made anew, and only other values handed to deepcopy. A module type with a copy protocol of its
    own goes through deepcopy whole."""
    got = memo.get(id(module))
    if got is not None:
        return got  # type: ignore[return-value]
    cls = type(module)
    if _own_copy_protocol(cls):
        return copy.deepcopy(module, memo)
    new = cls.__new__(cls)
    memo[id(module)] = new
    state = module.__getstate__()
    for key, value in state.items():
        if key == "_modules":
            state[key] = type(value)((n, None if c is None else copy_module(c, memo)) for n, c in value.items())
        elif key in ("_parameters", "_buffers"):
            state[key] = type(value)((n, None if t is None else _copy_tensor(t, memo)) for n, t in value.items())
        elif type(value) in _EMPTY_COPYABLE and not value:
            state[key] = type(value)()
        elif type(value) not in _ATOMIC and not (type(value) is tuple and all(type(v) in _ATOMIC for v in value)):
            state[key] = copy.deepcopy(value, memo)
    new.__setstate__(state)
    return new


def _copy_tensor(t: Tensor, memo: dict[int, object]) -> Tensor:
    got = memo.get(id(t))
    if got is None:
        if type(t) is nn.Parameter and not t.__dict__:
            got = nn.Parameter(t.detach().clone(), t.requires_grad)
        elif type(t) is Tensor and t.is_leaf and t.grad is None and not t.__dict__:
            got = t.detach().clone().requires_grad_(t.requires_grad)
        else:
            got = copy.deepcopy(t, memo)
        memo[id(t)] = got
    return got  # type: ignore[return-value]


@functools.cache
def _own_copy_protocol(cls: type) -> bool:
    return (
        getattr(cls, "__deepcopy__", None) is not None
        or cls.__reduce_ex__ is not object.__reduce_ex__
        or cls.__reduce__ is not object.__reduce__
        or cls.__getstate__ is not nn.Module.__getstate__
        or any("__slots__" in vars(k) for k in cls.__mro__)
    )


def apply_overrides(model: nn.Module, overrides: Mapping[str, Tensor]) -> None:
    state = model.state_dict(keep_vars=True)
    for name, value in overrides.items():
        if name not in state:
            raise PruneCliError(f"weight override names {name!r}, which the pruned model does not have")
        if tuple(state[name].shape) != tuple(value.shape):
            raise PruneCliError(
                f"weight override {name!r} has shape {tuple(value.shape)}; the pruned model needs "
                f"{tuple(state[name].shape)}"
            )
        with torch.no_grad():
            state[name].copy_(value)
