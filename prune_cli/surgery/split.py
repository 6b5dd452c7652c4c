"""The project's one fx trace and one graph split.

`trace(model)`: `torch.fx` with the registered leaf types (dynamic modules) kept as leaves, and any failure one
UnsupportedGraph that says why. `split(gm, at)`: the graph in two, `head` (image -> the values crossing the cut) and
`tail` (those values -> output), so that the two compose to the model. Used by SINF (at a cut vertex, to share early
layers between subgraphs) and by the `sensitivity` criterion (at any node, to reuse the part before a damage).

Cut vertices are nodes after which nothing computed earlier is read again (in a ResNet the block outputs, in a VGG
every ReLU and pooling). Both halves are `fx.GraphModule`s holding the original modules under their original names,
so a half's state dict uses the full model's parameter names.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from prune_cli.errors import PruneCliError, UnsupportedGraph

# Module types fx must not enter (input-dependent control flow): the dynamic modules register themselves.
TRACE_LEAF_TYPES: list[type[nn.Module]] = []


def register_trace_leaf(module_type: type[nn.Module]) -> type[nn.Module]:
    """Keep `module_type` (and its subclasses) as a `call_module` leaf of `trace` (usable as a class decorator)."""
    TRACE_LEAF_TYPES.append(module_type)
    return module_type


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, tuple(TRACE_LEAF_TYPES)) or super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module, purpose: str = "this step") -> fx.GraphModule:
    """`model` as an fx graph (registered leaf types kept as leaves); UnsupportedGraph naming `purpose` and the
    reason when torch.fx cannot trace it."""
    try:
        tracer = _Tracer()
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many kinds; the user needs the reason, not the type
        raise UnsupportedGraph(f"{purpose} needs a model torch.fx can trace: {type(exc).__name__}: {exc}") from exc
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


_RELUS = (nn.ReLU, nn.ReLU6)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d)


def _is_activation_or_pool(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_module":
        return isinstance(gm.get_submodule(str(n.target)), _RELUS + _POOLS)
    if n.op == "call_function":
        return n.target in (F.relu, torch.relu, F.max_pool2d, F.avg_pool2d, F.relu6)
    return n.op == "call_method" and n.target in ("relu", "relu_")


def cut_nodes(gm: fx.GraphModule) -> list[str]:
    """Names of nodes after which nothing computed earlier is read again (the graph's cut vertices)."""
    nodes = [n for n in gm.graph.nodes if n.op not in ("get_attr", "output")]
    index = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((index[u] for u in n.users if u in index), default=index[n]) for n in nodes}
    out, live_until = [], -1
    for i, n in enumerate(nodes):
        if live_until <= i and n.op != "placeholder":
            out.append(n.name)
        live_until = max(live_until, last_use[n])
    return out


@dataclass(frozen=True)
class Candidate:
    """A node the router may attach at: its name, channels and feature-map size."""

    node: str
    label: str
    channels: int
    hw: tuple[int, int]


def attach_candidates(gm: fx.GraphModule, example_input: Tensor) -> list[Candidate]:
    """Cut nodes that output a feature map right after a ReLU or a pooling, in graph order.

    A ReLU whose only reader is a pooling is skipped: the pooled map is the same information, smaller.
    """
    shapes: dict[str, tuple[int, ...]] = {}

    class Shapes(fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            if isinstance(result, Tensor):
                shapes[n.name] = tuple(result.shape)
            return result

    was_training = gm.training
    gm.eval()  # also keeps BatchNorm statistics untouched
    with torch.no_grad():
        Shapes(gm).run(example_input)
    gm.train(was_training)
    cuts = set(cut_nodes(gm))
    out = []
    for n in gm.graph.nodes:
        if n.name not in cuts or not _is_activation_or_pool(gm, n) or len(shapes.get(n.name, ())) != 4:
            continue
        users = list(n.users)
        if len(users) == 1 and _is_activation_or_pool(gm, users[0]) and users[0].name in cuts:
            continue
        label = str(n.target) if n.op == "call_module" else _label(n)
        _, c, h, w = shapes[n.name]
        out.append(Candidate(n.name, label, c, (h, w)))
    return out


def _label(n: fx.Node) -> str:
    """A readable name for a function node: its enclosing module's path ("layer1.0 (relu_2)")."""
    stack = n.meta.get("nn_module_stack") or {}
    return f"{list(stack)[-1]} ({n.name})" if stack else n.name


def split(gm: fx.GraphModule, at: str | int) -> tuple[fx.GraphModule, fx.GraphModule]:
    """(head, tail): the graph cut in two.

    `at` a node name, which must be a cut vertex: head(x) is the value of that node and tail(that value) the model's
    output. `at` a node index (> 0): the cut falls before that node and any values may cross it; head(x) returns
    the tuple of every value computed before it and read at or after it, and tail(*that tuple) the output.
    """
    nodes = list(gm.graph.nodes)
    names = [n.name for n in nodes]
    if isinstance(at, str):
        if at not in names:
            raise PruneCliError(f"the model's graph has no node {at!r} to split at")
        if at not in cut_nodes(gm):
            raise PruneCliError(f"node {at!r} does not cut the graph in two (later layers read earlier values)")
        index = names.index(at) + 1
    elif 0 < at < len(nodes):
        index = at
    else:
        raise ValueError(f"cut index {at} is outside (0, {len(nodes)})")
    head_nodes, tail_nodes = nodes[:index], nodes[index:]
    tail_set = set(tail_nodes)
    live = [n for n in head_nodes if n.op != "get_attr" and any(u in tail_set for u in n.users)]
    head, head_env = fx.Graph(), {}
    for n in head_nodes:
        head_env[n] = head.node_copy(n, lambda a: head_env[a])
    head.output(head_env[live[0]] if isinstance(at, str) else tuple(head_env[n] for n in live))
    tail, tail_env = fx.Graph(), {}
    for i, n in enumerate(live):
        tail_env[n] = tail.placeholder("h" if isinstance(at, str) else f"live_{i}")
    for n in tail_nodes:
        if n.op == "placeholder":
            continue
        for a in n.all_input_nodes:  # get_attr nodes defined before the cut are re-read in the tail
            if a not in tail_env and a.op == "get_attr":
                tail_env[a] = tail.node_copy(a, lambda b: tail_env[b])
        tail_env[n] = tail.node_copy(n, lambda a: tail_env[a])
    return fx.GraphModule(gm, head, "Head").eval(), fx.GraphModule(gm, tail, "Tail").eval()


_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.iand, operator.ior}


def writes_in_place(gm: fx.GraphModule) -> bool:
    """Whether any node of `gm` may write into one of its inputs (an in-place module, function or method): then a
    tail given cached head values must get copies."""
    for n in gm.graph.nodes:
        if n.op == "call_module" and getattr(gm.get_submodule(str(n.target)), "inplace", False):
            return True
        if n.op == "call_function" and (n.target in _INPLACE_FUNCTIONS or bool(n.kwargs.get("inplace", False))):
            return True
        if n.op == "call_method" and str(n.target).endswith("_"):
            return True
    return False


@torch.no_grad()
def gap_features(gm: fx.GraphModule, nodes: Sequence[str], x: Tensor, batch_size: int = 256) -> dict[str, Tensor]:
    """Global-average-pooled outputs (N, C) of the named nodes on images x, one pass for all nodes."""
    wanted = set(nodes)
    parts: dict[str, list[Tensor]] = {n: [] for n in nodes}
    device = next(gm.parameters()).device

    class Capture(fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            if n.name in wanted:
                parts[n.name].append(result.float().mean((2, 3)).cpu())
            return result

    was_training = gm.training
    gm.eval()
    for i in range(0, len(x), batch_size):
        Capture(gm).run(x[i : i + batch_size].to(device))
    gm.train(was_training)
    return {n: torch.cat(p) for n, p in parts.items()}


def node_index(gm: fx.GraphModule) -> dict[str, int]:
    """Module name -> position of its first call in the graph."""
    out: dict[str, int] = {}
    for i, n in enumerate(gm.graph.nodes):
        if n.op == "call_module":
            out.setdefault(str(n.target), i)
    return out
