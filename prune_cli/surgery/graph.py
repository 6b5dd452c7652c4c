"""Channel groups from one recorded forward pass, with a union-find over the operations that couple channels.

The model runs once on the example input under a `TorchFunctionMode`, which sees every torch function and tensor
method called on the input or on anything computed from it. Only shapes matter, so convolutions are not computed:
each returns zeros of its output's shape, and the pass costs a few milliseconds whatever the model's compute and
input size. (A torch.fx trace and a shape pass cost more than the whole surgery's budget: benchmarks/README.md.)

Every tensor computed from the input carries a *layout*: a list of segments (space, length, expand), where a space
is a set of channels born at one producer (a conv's or linear's outputs, or the image) and `expand` is the number
of features per channel after a flatten. Producers create spaces; BatchNorm, activations, pooling and dropout pass
layouts through; `torch.cat` on dim 1 concatenates them (offsets into the consumer); a depthwise conv keeps its
input's space (its in and out channels are coupled); an addition or multiplication of two tensors unites their
spaces (residual). Each union-find root is one `ChannelGroup`. A conv, linear or BatchNorm call is named after the
module that owns its weight.

An operation that is not understood raises `UnsupportedGraph` naming it and the line of model code that called it:
nothing is silently skipped. So does a forward that reads the values of what it computes (`if x.sum() > 0`): the
channels it reaches could change from one input to the next, and this pass computes no real values. Python control
flow on shapes is fine.
"""

from __future__ import annotations

import itertools
import os
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode, resolve_name
from torch.utils._pytree import tree_leaves

from prune_cli.api import ChannelGroup, Member
from prune_cli.errors import UnsupportedGraph

# Element-wise: the result has the input's shape and channels. The pass hands back the input itself, uncomputed.
ELEMENTWISE = {
    F.relu, F.relu_, F.relu6, F.hardtanh, F.leaky_relu, F.elu, F.gelu, F.silu, F.hardswish, F.hardsigmoid,
    F.dropout, F.dropout1d, F.dropout2d, F.mish, F.selu, F.celu, F.softplus, torch.relu, torch.relu_, torch.sigmoid,
    torch.tanh, Tensor.relu, Tensor.relu_, Tensor.sigmoid, Tensor.tanh,
}  # fmt: skip
# Spatial or type changes: the channels pass unchanged (nn.Upsample calls F.interpolate).
PASS_FUNCTIONS = ELEMENTWISE | {
    F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.interpolate, Tensor.contiguous,
    Tensor.clone, Tensor.float, Tensor.to, Tensor.detach,
}  # fmt: skip
BINARY = {
    torch.add, torch.mul, torch.sub, Tensor.add, Tensor.add_, Tensor.mul, Tensor.mul_, Tensor.sub, Tensor.sub_,
    Tensor.__add__, Tensor.__radd__, Tensor.__iadd__, Tensor.__mul__, Tensor.__rmul__, Tensor.__imul__,
    Tensor.__sub__, Tensor.__rsub__, Tensor.__isub__,
}  # fmt: skip
RESHAPE = {torch.flatten, Tensor.flatten, Tensor.view, Tensor.reshape, torch.reshape}
CONCAT = {torch.cat, torch.concat, torch.concatenate}
MEAN = {torch.mean, Tensor.mean}
# Results that are values, not tensors: a forward that branches on them may reach other channels for other inputs.
VALUE_READS = {
    Tensor.__bool__, Tensor.item, Tensor.tolist, Tensor.__int__, Tensor.__float__, Tensor.__index__, Tensor.numpy,
    Tensor.equal, torch.equal, Tensor.allclose, torch.allclose,
}  # fmt: skip
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep

# Module types a later step wraps (dynamic methods): the pass does not look inside them, and reads each as the
# conv, linear or BatchNorm it derives from, or else as keeping its input's channels.
LEAF_PASS_TYPES: list[type[nn.Module]] = []
_analysing = False


def register_pass_through_leaf(module_type: type[nn.Module]) -> type[nn.Module]:
    """Mark a module type as a leaf of the analysis (usable as a class decorator)."""
    LEAF_PASS_TYPES.append(module_type)
    return module_type


def analysing() -> bool:
    """True while the channel analysis runs a model: a module with a faster path for real inputs (one that computes
    fewer channels) takes its reference path, whose channels are those the analysis must see."""
    return _analysing


@dataclass(frozen=True)
class Segment:
    space: int
    length: int
    expand: int = 1


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def new(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # the older space stays root: ids follow call order


@dataclass
class TracedModel:
    """The channel groups and per-layer cost terms, kept so that costs can be predicted for any keep-plan."""

    groups: list[ChannelGroup]
    layer_info: dict[str, dict]  # conv/linear name -> {"k": ..., "hw": ..., "in": ..., "out": ..., ...}


Layout = list[Segment] | None  # None: computed from the input, but without a channel dimension (a size, a scalar)


class _Pass(TorchFunctionMode):
    """One forward pass that gives every tensor computed from the input its layout (module docstring)."""

    def __init__(self, named_modules: list[tuple[str, nn.Module]]) -> None:
        super().__init__()
        self.uf = _UnionFind()
        self.space_len: list[int] = []
        self.members: dict[int, list[Member]] = {}
        self.producer_of: dict[int, str] = {}
        self.blocked: set[int] = set()
        self.residual: set[int] = set()
        self.layer_info: dict[str, dict] = {}
        self.layouts: dict[int, Layout] = {}  # id(tensor) -> layout, for every tensor computed from the input
        self.alive: list[Tensor] = []  # those tensors, kept so that no id is reused during the pass
        self.owner, self.leaves = _owners(named_modules)
        self.leaf_depth = 0

    # -- recording ---------------------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.leaf_depth:
            return func(*args, **kwargs)
        ins = [t for t in _tensors(args, kwargs) if id(t) in self.layouts]
        if not ins:  # parameters, constants: not the input's business
            return func(*args, **kwargs)
        if func in VALUE_READS:
            raise UnsupportedGraph(
                f"the forward pass reads values computed from its input ({_name(func)}{_where()}); channel analysis "
                "needs a forward whose path does not depend on the input's values"
            )
        out = None
        if func is F.conv2d:
            out = _conv_zeros(args, kwargs)
        elif func in ELEMENTWISE or func is F.batch_norm:
            out = _arg(args, kwargs, "input", 0)
        if out is None:
            out = func(*args, **kwargs)
        if isinstance(out, Tensor):  # a scalar (a sum, a norm) has no channels that a removal could change
            chan = [t for t in ins if self.layouts[id(t)] is not None]
            self.record(out, self.layout(func, args, kwargs, chan, out) if chan and out.dim() else None)
        elif func is Tensor.__setitem__ or any(isinstance(t, Tensor) for t in tree_leaves(out)):
            raise UnsupportedGraph(f"cannot reason about channels through {_name(func)}{_where()}")
        return out

    def record(self, t: Tensor, layout: Layout) -> None:
        self.layouts[id(t)] = layout
        self.alive.append(t)

    def enter_leaf(self, module: nn.Module, args: tuple) -> None:
        self.leaf_depth += 1

    def leave_leaf(self, name: str, module: nn.Module, args: tuple, out: object) -> None:
        self.leaf_depth -= 1
        x = args[0] if args else None
        if self.leaf_depth or not isinstance(x, Tensor) or self.layouts.get(id(x)) is None:
            return
        if not isinstance(out, Tensor):
            raise UnsupportedGraph(f"{name} ({type(module).__name__}) does not return one tensor")
        first, shp = self.layouts[id(x)], tuple(out.shape)
        if isinstance(module, nn.Conv2d):
            self.record(out, self.conv(name, module, first, shp))
        elif isinstance(module, nn.Linear):
            self.record(out, self.linear(name, module, first, shp))
        else:
            if isinstance(module, _BatchNorm):  # as for a F.batch_norm call
                self.add_members(first, name, "bn")
            self.record(out, first)

    # -- layouts -----------------------------------------------------------------------------------------------
    def layout(self, func, args: tuple, kwargs: dict, chan: list[Tensor], out: Tensor) -> Layout:
        """The layout of `func`'s result; `chan`: its tensor arguments that have channels, in order."""
        first, shp = self.layouts[id(chan[0])], tuple(out.shape)
        if func is F.conv2d:
            return self.conv(*self.owner_of(func, _arg(args, kwargs, "weight", 1), nn.Conv2d), first, shp)
        if func is F.linear:
            return self.linear(*self.owner_of(func, _arg(args, kwargs, "weight", 1), nn.Linear), first, shp)
        if func is F.batch_norm:
            weight = _arg(args, kwargs, "weight", 3)
            held = weight if weight is not None else _arg(args, kwargs, "running_mean", 1)
            if held is not None:  # else nothing to cut: channels pass
                self.add_members(first, self.owner_of(func, held, _BatchNorm)[0], "bn")
            return first
        if func in PASS_FUNCTIONS:
            return first
        if func is F.pad and len(_arg(args, kwargs, "pad", 1)) <= 4:
            return first  # pads the two spatial dimensions only
        if func in RESHAPE:
            return _flatten(func, tuple(chan[0].shape), shp, first)
        if func in BINARY:
            return self.unite(func, first, self.layouts[id(chan[1])]) if len(chan) == 2 else first
        if func in CONCAT:
            dim, parts = _arg(args, kwargs, "dim", 1, 0), _arg(args, kwargs, "tensors", 0)
            if dim in (1, -3) or (dim == -1 and len(shp) == 2):
                if all(self.layouts.get(id(t)) is not None for t in parts):
                    return [seg for t in parts for seg in self.layouts[id(t)]]
                raise UnsupportedGraph(f"{_name(func)} joins a tensor that is not computed from the input{_where()}")
            raise UnsupportedGraph(f"{_name(func)} along dim {dim} is not supported{_where()}")
        if func in MEAN and len(shp) == 2:
            return first
        raise UnsupportedGraph(f"cannot reason about channels through {_name(func)}{_where()}")

    def owner_of(self, func, t: Tensor | None, kind: type[nn.Module]) -> tuple[str, nn.Module]:
        """The module that owns `t`, a weight (or BatchNorm buffer) handed to `func`: it names the layer."""
        name, module = self.owner.get(id(t), (None, None))
        if not isinstance(module, kind):
            raise UnsupportedGraph(
                f"{_name(func)} is given a weight that is not the own parameter of a {kind.__name__.lstrip('_')} "
                f"layer{_where()}; surgery prunes nn.Conv2d, nn.Linear and BatchNorm layers"
            )
        return name, module

    def new_space(self, length: int, producer: str | None) -> list[Segment]:
        s = self.uf.new()
        self.space_len.append(length)
        if producer is None:
            self.blocked.add(s)
        else:
            self.producer_of[s] = producer
        return [Segment(s, length)]

    def add_members(self, layout: list[Segment], module: str, kind: str) -> None:
        offset = 0
        for seg in layout:
            if kind != "linear_in" and seg.expand != 1:
                raise UnsupportedGraph(f"{module}: a flattened tensor feeds a {kind} layer")
            self.members.setdefault(seg.space, []).append(Member(module, kind, offset, seg.expand))  # type: ignore[arg-type]
            offset += seg.length * seg.expand

    def unite(self, func, a: list[Segment], b: list[Segment]) -> list[Segment]:
        if [(s.length, s.expand) for s in a] != [(s.length, s.expand) for s in b]:
            raise UnsupportedGraph(f"{_name(func)} combines tensors of different channel layouts{_where()}")
        for sa, sb in zip(a, b, strict=True):
            self.uf.union(sa.space, sb.space)
            self.residual.update((sa.space, sb.space))
        return a

    def conv(self, name: str, m: nn.Conv2d, first: list[Segment], shp: tuple) -> list[Segment]:
        k = m.kernel_size[0] * m.kernel_size[1]
        self.layer_info[name] = {"type": "conv", "k": k, "hw": shp[2] * shp[3], "in": m.in_channels,
                                 "out": m.out_channels, "groups": m.groups, "bias": m.bias is not None}  # fmt: skip
        if m.groups == 1:
            self.add_members(first, name, "conv_in")
            out = self.new_space(m.out_channels, name)
            self.add_members(out, name, "conv_out")
            return out
        if m.groups == m.in_channels == m.out_channels:
            self.add_members(first, name, "depthwise")
            return first
        # A grouped conv ties channels in blocks: keep both sides whole rather than guess.
        out = self.new_space(m.out_channels, name)
        self.blocked.update(seg.space for seg in first + out)
        return out

    def linear(self, name: str, m: nn.Linear, first: list[Segment], shp: tuple) -> list[Segment]:
        self.layer_info[name] = {"type": "linear", "k": 1, "hw": 1, "in": m.in_features, "out": m.out_features,
                                 "groups": 1, "bias": m.bias is not None}  # fmt: skip
        if len(shp) != 2:
            raise UnsupportedGraph(f"{name}: Linear on a {len(shp)}-D tensor is not supported")
        self.add_members(first, name, "linear_in")
        out = self.new_space(m.out_features, name)
        self.add_members(out, name, "linear_out")
        return out

    def groups(self) -> list[ChannelGroup]:
        """One group per union-find root, in call order of its oldest space."""
        by_root: dict[int, list[int]] = {}
        for s in range(len(self.uf.parent)):
            by_root.setdefault(self.uf.find(s), []).append(s)
        groups = []
        for root, spaces in sorted(by_root.items()):
            mem = [m for s in spaces for m in self.members.get(s, [])]
            producers = [self.producer_of[s] for s in spaces if s in self.producer_of]
            prunable = bool(producers) and not any(s in self.blocked for s in spaces)
            gid = producers[0] if producers else "input"
            residual = any(s in self.residual for s in spaces)
            groups.append(ChannelGroup(gid, self.space_len[root], tuple(mem), prunable, residual))
        return groups


def analyse(model: nn.Module, example_input: Tensor) -> TracedModel:
    """Run `model` once on `example_input` (1, C, H, W) and derive its channel groups and per-layer cost terms.
    The model runs in eval mode without autograd; each module's training flag is restored after."""
    global _analysing
    named = list(model.named_modules())
    rec = _Pass(named)
    training = [(m, m.training) for _, m in named]
    hooks = []
    for name, m in rec.leaves:
        hooks += [m.register_forward_pre_hook(rec.enter_leaf), m.register_forward_hook(partial(rec.leave_leaf, name))]
    for _, m in named:  # eval(): Module.__setattr__ on every layer would cost a tenth of the pass
        m.__dict__["training"] = False
    rec.record(example_input, rec.new_space(example_input.shape[1], None) if example_input.dim() >= 2 else None)
    try:
        _analysing = True
        with torch.no_grad(), rec:
            out = model(example_input)
    except UnsupportedGraph:
        raise
    except Exception as exc:  # the user's forward failed: say so in one line, with where
        raise UnsupportedGraph(
            f"{type(model).__name__} fails on an input of shape {tuple(example_input.shape)}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    finally:
        _analysing = False
        for h in hooks:
            h.remove()
        for m, flag in training:
            m.__dict__["training"] = flag
    for t in tree_leaves(out):  # the outputs (logits) are never prunable
        if isinstance(t, Tensor):
            rec.blocked.update(seg.space for seg in rec.layouts.get(id(t)) or [])
    return TracedModel(rec.groups(), rec.layer_info)


def _owners(
    named_modules: list[tuple[str, nn.Module]],
) -> tuple[dict[int, tuple[str, nn.Module]], list[tuple[str, nn.Module]]]:
    """id(parameter or buffer) -> (name, module) that owns it; and the modules the pass reads whole, by their type
    rather than by the functions they call: `LEAF_PASS_TYPES`, and layers that share a tensor with another (a weight
    names its layer only when one layer owns it)."""
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, m in named_modules:
        for t in (*m._parameters.values(), *m._buffers.values()):
            if t is not None:
                owners.setdefault(id(t), []).append((name, m))
    tied = {name for pairs in owners.values() if len(pairs) > 1 for name, _ in pairs}
    leaf_types = tuple(LEAF_PASS_TYPES)
    leaves = [(name, m) for name, m in named_modules if name in tied or isinstance(m, leaf_types)]
    return {key: pairs[0] for key, pairs in owners.items()}, leaves


def _arg(args: tuple, kwargs: dict, key: str, pos: int, default=None):
    """A call's argument given by keyword `key` or at position `pos`."""
    return kwargs[key] if key in kwargs else args[pos] if len(args) > pos else default


def _tensors(args: tuple, kwargs: dict) -> Iterator[Tensor]:
    """The tensors among a call's arguments, one level into lists and tuples (torch.cat's)."""
    for a in itertools.chain(args, kwargs.values()):
        if isinstance(a, Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (t for t in a if isinstance(t, Tensor))


def _conv_zeros(args: tuple, kwargs: dict) -> Tensor | None:
    """Zeros of the shape `F.conv2d(*args, **kwargs)` would return, or None where that is not a plain, valid 4-D
    case."""
    a = dict(zip(_CONV_ARGS, args, strict=False))
    a.update(kwargs)
    x, w = a["input"], a["weight"]
    if x.dim() != 4 or w.dim() != 4 or x.shape[1] != w.shape[1] * a.get("groups", 1):
        return None  # the real call computes it, or says what is wrong
    stride, padding, dilation = (_pair(a.get(k, d)) for k, d in (("stride", 1), ("padding", 0), ("dilation", 1)))
    if padding == ("same", "same"):
        size = x.shape[2:]
    else:
        padding = (0, 0) if padding == ("valid", "valid") else padding
        size = [(x.shape[2 + i] + 2 * padding[i] - dilation[i] * (w.shape[2 + i] - 1) - 1) // stride[i] + 1
                for i in (0, 1)]  # fmt: skip
    return x.new_zeros(x.shape[0], w.shape[0], *size) if min(size) > 0 else None


def _pair(v) -> tuple:
    return (v, v) if isinstance(v, (int, str)) else tuple(v)


def _flatten(func, src_shape: tuple, shp: tuple, layout: list[Segment]) -> list[Segment]:
    if len(shp) != 2 or shp[0] != src_shape[0]:
        if shp == src_shape:
            return layout
        raise UnsupportedGraph(f"{_name(func)} to {shp} is not a flatten of the channel dimension{_where()}")
    expand = 1
    for d in src_shape[2:]:
        expand *= d
    return [Segment(s.space, s.length, s.expand * expand) for s in layout]


def _name(func) -> str:
    return resolve_name(func) or getattr(func, "__qualname__", repr(func))


def _where() -> str:
    """`, called at FILE:LINE in FUNCTION`: the innermost frame of the model's own code."""
    for frame in reversed(traceback.extract_stack()):
        if not frame.filename.startswith(_TORCH_DIR) and frame.filename != __file__:
            return f", called at {frame.filename}:{frame.lineno} in {frame.name}"
    return ""


def channel_groups(model: nn.Module, example_input: Tensor) -> list[ChannelGroup]:
    """Every channel group of `model` (prunable or not), in call order. example_input: (1, C, H, W)."""
    return analyse(model, example_input).groups
