"""Channel groups from a torch.fx trace, with a union-find over the ops that couple channels.

Every tensor with a channel dimension carries a *layout*: a list of segments (space, length, expand), where a
space is a set of channels born at one producer (a conv's or linear's outputs, or the image) and `expand` is the
number of features per channel after a flatten. Producers create spaces; BatchNorm, activations, pooling and
dropout pass layouts through; `torch.cat` on dim 1 concatenates them (offsets into the consumer); a depthwise
conv keeps its input's space (its in and out channels are coupled); an addition or multiplication of two
tensors unites their spaces (residual). Each union-find root is one `ChannelGroup`.

Ops that are not understood raise `UnsupportedGraph` naming the node: nothing is silently skipped.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from prune_cli.api import ChannelGroup, Member
from prune_cli.errors import UnsupportedGraph

PASS_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
    nn.Identity, nn.Dropout, nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)  # fmt: skip
PASS_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.dropout, F.max_pool2d,
    F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.relu, torch.sigmoid, torch.tanh,
}  # fmt: skip
PASS_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "float", "to"}
BINARY = {operator.add, operator.iadd, operator.mul, operator.imul, torch.add, torch.mul, operator.sub, torch.sub}

# Module types a later step wraps (dynamic methods) and that tracing must not enter; they pass channels through.
LEAF_PASS_TYPES: list[type[nn.Module]] = []


def register_pass_through_leaf(module_type: type[nn.Module]) -> type[nn.Module]:
    """Mark a module type as an fx leaf that keeps its input's channels (usable as a class decorator)."""
    LEAF_PASS_TYPES.append(module_type)
    return module_type


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, tuple(LEAF_PASS_TYPES)) or super().is_leaf_module(m, qualname)


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
            self.parent[max(ra, rb)] = min(ra, rb)  # the older space stays root: ids follow graph order


@dataclass
class TracedModel:
    """The traced graph with per-node layouts, kept so that costs can be predicted for any keep-plan."""

    graph: fx.Graph
    groups: list[ChannelGroup]
    layer_info: dict[str, dict]  # conv/linear name -> {"macs_per_io": ..., "in": ..., "out": ..., ...}


def trace(model: nn.Module) -> fx.Graph:
    """The fx graph of `model`. Not wrapped in a GraphModule: its code generation costs as much as the trace, and
    the analysis only reads the graph."""
    try:
        return _Tracer().trace(model)
    except Exception as exc:  # fx raises many kinds of errors on data-dependent control flow
        raise UnsupportedGraph(f"torch.fx cannot trace {type(model).__name__}: {exc}") from exc


@torch.no_grad()
def annotate_shapes(model: nn.Module, graph: fx.Graph, example_input: Tensor, modules: dict[str, nn.Module]) -> None:
    """Run `graph` on `example_input` with `model`'s own modules (`modules`: its named modules; eval mode); each
    tensor node gets `node.meta["shape"]`. The same as fx's ShapeProp, without the GraphModule it needs."""
    values: dict[fx.Node, object] = {}
    was_training = model.training
    model.eval()
    try:
        for node in graph.nodes:
            args = fx.node.map_arg(node.args, values.__getitem__)
            kwargs = fx.node.map_arg(node.kwargs, values.__getitem__)
            if node.op == "placeholder":
                value = example_input
            elif node.op == "get_attr":
                value = operator.attrgetter(node.target)(model)  # dotted paths, like fx
            elif node.op == "call_module":
                value = modules[node.target](*args, **kwargs)
            elif node.op == "call_function":
                value = node.target(*args, **kwargs)
            elif node.op == "call_method":
                value = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:  # output
                break
            values[node] = value
            if isinstance(value, Tensor):
                node.meta["shape"] = tuple(value.shape)
    finally:
        model.train(was_training)


def analyse(model: nn.Module, example_input: Tensor) -> TracedModel:
    """Trace `model` on `example_input` (1, C, H, W) and derive its channel groups and per-layer cost terms."""
    graph = trace(model)
    modules = dict(model.named_modules())
    annotate_shapes(model, graph, example_input, modules)
    uf = _UnionFind()
    layouts: dict[fx.Node, list[Segment] | None] = {}
    members: dict[int, list[Member]] = {}
    producer_of: dict[int, str] = {}
    blocked: set[int] = set()
    residual: set[int] = set()
    layer_info: dict[str, dict] = {}
    space_len: list[int] = []

    def new_space(length: int, producer: str | None) -> list[Segment]:
        s = uf.new()
        space_len.append(length)
        if producer is None:
            blocked.add(s)
        else:
            producer_of[s] = producer
        return [Segment(s, length)]

    def add_members(layout: list[Segment], module: str, kind: str) -> None:
        offset = 0
        for seg in layout:
            if kind != "linear_in" and seg.expand != 1:
                raise UnsupportedGraph(f"{module}: a flattened tensor feeds a {kind} layer")
            members.setdefault(seg.space, []).append(Member(module, kind, offset, seg.expand))  # type: ignore[arg-type]
            offset += seg.length * seg.expand

    def unite(node: fx.Node, a: list[Segment], b: list[Segment]) -> list[Segment]:
        if [(s.length, s.expand) for s in a] != [(s.length, s.expand) for s in b]:
            raise UnsupportedGraph(f"node {node.name!r} ({node.target}) combines tensors of different channel layouts")
        for sa, sb in zip(a, b, strict=True):
            uf.union(sa.space, sb.space)
            residual.update((sa.space, sb.space))
        return a

    def tensor_args(node: fx.Node) -> list[fx.Node]:
        return [a for a in node.all_input_nodes if layouts.get(a) is not None]

    for node in graph.nodes:
        shp = node.meta.get("shape")
        if node.op == "placeholder":
            layouts[node] = new_space(shp[1], None) if shp and len(shp) >= 2 else None
            continue
        if node.op == "get_attr":
            layouts[node] = None
            continue
        if node.op == "output":
            for a in node.all_input_nodes:
                for seg in layouts.get(a) or []:
                    blocked.add(seg.space)
            continue
        ins = tensor_args(node)
        if shp is None:  # size(), shape arithmetic: no channels
            layouts[node] = None
            continue
        layouts[node] = _layout(node, shp, ins, layouts, modules, new_space, add_members, unite, blocked, layer_info)

    # Gather groups per union-find root, in graph order of their oldest space.
    by_root: dict[int, list[int]] = {}
    for s in range(len(uf.parent)):
        by_root.setdefault(uf.find(s), []).append(s)
    groups = []
    for root, spaces in sorted(by_root.items()):
        mem = [m for s in spaces for m in members.get(s, [])]
        producers = [producer_of[s] for s in spaces if s in producer_of]
        gid = producers[0] if producers else "input"
        size = space_len[root]
        prunable = bool(producers) and not any(s in blocked for s in spaces)
        groups.append(ChannelGroup(gid, size, tuple(mem), prunable, any(s in residual for s in spaces)))
    return TracedModel(graph, groups, layer_info)


def _layout(node, shp, ins, layouts, modules, new_space, add_members, unite, blocked, layer_info):
    """The output layout of one node (see the module docstring)."""
    first = layouts[ins[0]] if ins else None
    if node.op == "call_module":
        m = modules[node.target]
        name = str(node.target)
        if isinstance(m, nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1]
            layer_info[name] = {"type": "conv", "k": k, "hw": shp[2] * shp[3], "in": m.in_channels,
                                "out": m.out_channels, "groups": m.groups, "bias": m.bias is not None}  # fmt: skip
            if m.groups == 1:
                add_members(first, name, "conv_in")
                out = new_space(m.out_channels, name)
                add_members(out, name, "conv_out")
                return out
            if m.groups == m.in_channels == m.out_channels:
                add_members(first, name, "depthwise")
                return first
            # A grouped conv ties channels in blocks: keep both sides whole rather than guess.
            for seg in first:
                blocked.add(seg.space)
            out = new_space(m.out_channels, name)
            for seg in out:
                blocked.add(seg.space)
            return out
        if isinstance(m, nn.Linear):
            layer_info[name] = {"type": "linear", "k": 1, "hw": 1, "in": m.in_features, "out": m.out_features,
                                "groups": 1, "bias": m.bias is not None}  # fmt: skip
            if len(shp) != 2:
                raise UnsupportedGraph(f"{name}: Linear on a {len(shp)}-D tensor is not supported")
            add_members(first, name, "linear_in")
            out = new_space(m.out_features, name)
            add_members(out, name, "linear_out")
            return out
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            add_members(first, name, "bn")
            return first
        if isinstance(m, nn.Flatten):
            return _flatten(node, ins[0], shp, first)
        if isinstance(m, PASS_MODULES) or isinstance(m, tuple(LEAF_PASS_TYPES)):
            return first
        raise UnsupportedGraph(f"node {node.name!r}: module {name!r} of type {type(m).__name__} is not supported")
    if node.op == "call_function":
        fn = node.target
        if fn in PASS_FUNCTIONS:
            return first
        if fn is torch.flatten:
            return _flatten(node, ins[0], shp, first)
        if fn in BINARY:
            if len(ins) == 2:
                return unite(node, layouts[ins[0]], layouts[ins[1]])
            return first
        if fn is torch.cat:
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            if dim not in (1, -3) and not (dim == -1 and len(shp) == 2):
                raise UnsupportedGraph(f"node {node.name!r}: torch.cat along dim {dim} is not supported")
            return [seg for a in node.args[0] for seg in layouts[a]]
        if fn is torch.mean and len(shp) == 2:
            return first
    if node.op == "call_method":
        if node.target in PASS_METHODS:
            return first
        if node.target in ("flatten", "view", "reshape"):
            return _flatten(node, ins[0], shp, first)
        if node.target == "mean" and len(shp) == 2:
            return first
    raise UnsupportedGraph(f"cannot reason about channels through node {node.name!r} ({node.op} {node.target})")


def _flatten(node: fx.Node, src: fx.Node, shp, layout):
    src_shape = src.meta["shape"]
    if len(shp) != 2 or shp[0] != src_shape[0]:
        if shp == src_shape:
            return layout
        raise UnsupportedGraph(f"node {node.name!r}: reshape to {shp} is not a flatten of the channel dimension")
    expand = 1
    for d in src_shape[2:]:
        expand *= d
    return [Segment(s.space, s.length, s.expand * expand) for s in layout]


def channel_groups(model: nn.Module, example_input: Tensor) -> list[ChannelGroup]:
    """Every channel group of `model` (prunable or not), in graph order. example_input: (1, C, H, W)."""
    return analyse(model, example_input).groups
