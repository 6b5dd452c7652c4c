"""Split a traced model in two at a node: `extractor` (image -> that node's value) and `tail` (that value ->
output), so that `tail(extractor(x)) == model(x)`. Used by SINF to share early layers between subgraphs.

Only cut vertices are valid split points: nodes after which nothing computed earlier is read again (in a
ResNet the block outputs, in a VGG every ReLU and pooling). Both halves are `fx.GraphModule`s holding the
original modules under their original names, so a half's state dict uses the full model's parameter names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from prune_cli.errors import PruneCliError, UnsupportedGraph


def trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many kinds; the user needs the reason, not the type
        raise UnsupportedGraph(f"SINF needs a model torch.fx can trace: {type(exc).__name__}: {exc}") from exc


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


def split(gm: fx.GraphModule, node_name: str) -> tuple[fx.GraphModule, fx.GraphModule]:
    """(extractor, tail): extractor(x) is the value of `node_name`; tail(that value) is the model's output."""
    nodes = list(gm.graph.nodes)
    names = [n.name for n in nodes]
    if node_name not in names:
        raise PruneCliError(f"the model's graph has no node {node_name!r} to split at")
    if node_name not in cut_nodes(gm):
        raise PruneCliError(f"node {node_name!r} does not cut the graph in two (later layers read earlier values)")
    at = names.index(node_name)
    head, head_env = fx.Graph(), {}
    for n in nodes[: at + 1]:
        head_env[n] = head.node_copy(n, lambda a: head_env[a])
    head.output(head_env[nodes[at]])
    tail, tail_env = fx.Graph(), {}
    tail_env[nodes[at]] = tail.placeholder("h")
    for n in nodes[at + 1 :]:
        if n.op == "placeholder":
            continue
        for a in n.all_input_nodes:  # get_attr nodes defined before the cut are re-read in the tail
            if a not in tail_env and a.op == "get_attr":
                tail_env[a] = tail.node_copy(a, lambda b: tail_env[b])
        tail_env[n] = tail.node_copy(n, lambda a: tail_env[a])
    extractor, rest = fx.GraphModule(gm, head, "SinfExtractor"), fx.GraphModule(gm, tail, "SinfSubgraph")
    return extractor.eval(), rest.eval()


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
