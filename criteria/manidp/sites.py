"""ManiDP: where the gates go, read from the model's structure (one fx trace), so that any CNN built of
conv -> BatchNorm steps is gated the same way: prune-cli's ResNets and VGGs, torchvision's ResNets, a user's model.

A conv is gated when it is ungrouped, a BatchNorm alone reads its output (the mask scales that BatchNorm's output),
it is not the stem (some other conv lies between it and the image), and its channels are a block's own: its
BatchNorm's output is not added into a residual sum (a ResNet block's first conv, every VGG conv), or its input comes
from a gated conv's BatchNorm (a block's second or third conv). This is what the official code gates (conv_a and
conv_b of each block, every VGG conv but the first); shortcut projections, which read and write the residual
stream, are never gated. Under `--scope internal` (the default selection scope, which keeps the residual stream
whole for every criterion) a conv whose channels feed a residual sum keeps its outputs (`Site.gated` False) and only
its input is gated. `prev`: the gated conv whose mask zeroes this conv's input channels, when only ReLUs and
max-pools lie between (a channel that is zero stays zero through them), so its executed MACs count only the kept
input channels.

Compact batch-1 inference (criteria/manidp/__init__.py) needs more than the sites: a residual block is run compact
when its own forward is exactly relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)) with an identity shortcut or one
child module (`block_plan`, matched on the block's own trace: prune-cli's BasicBlock and torchvision's), and an
nn.Sequential when each gated conv in it is followed by its BatchNorm and a ReLU (`features_plan`: VGG features).
Elsewhere the dense masked path runs, which is correct for any structure.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import fx, nn

from prune_cli.api.dynamic import DynamicModule
from prune_cli.api.graph import trace
from prune_cli.errors import UnsupportedGraph

_SUMS = {operator.add, operator.iadd, torch.add}
_RELU_NAMES = {"relu", "relu_"}
_POOL_NAMES = {"max_pool2d", "_max_pool2d"}


class Site(NamedTuple):
    """One gated conv: its module name, its BatchNorm's, the gated conv that gates its input (None: none), whether
    a ReLU reads the BatchNorm's output (the manifold loss pools the feature after it), and whether its own output
    channels are gated (`gated` False: only its input is, by `prev`; a residual block's last conv when the gates
    stay off the residual stream)."""

    conv: str
    bn: str
    prev: str | None
    relu: bool
    gated: bool = True


class BlockPlan(NamedTuple):
    """Attribute names in a residual block that runs compact at batch 1; `shortcut` None is the identity."""

    conv1: str
    bn1: str
    conv2: str
    bn2: str
    shortcut: str | None


def _module(modules: Mapping[str, nn.Module], n: fx.Node) -> nn.Module | None:
    return modules.get(str(n.target)) if n.op == "call_module" else None


def _is_relu(modules: Mapping[str, nn.Module], n: fx.Node) -> bool:
    if n.op == "call_module":
        return isinstance(_module(modules, n), nn.ReLU)
    return n.op in ("call_function", "call_method") and getattr(n.target, "__name__", n.target) in _RELU_NAMES


def _keeps_zero_channels(modules: Mapping[str, nn.Module], n: fx.Node) -> bool:
    """A ReLU or a max-pool: an all-zero channel stays all zero (what the compact path carries kept channels
    through)."""
    if _is_relu(modules, n):
        return True
    if n.op == "call_module":
        return isinstance(_module(modules, n), nn.MaxPool2d)
    return n.op == "call_function" and getattr(n.target, "__name__", "") in _POOL_NAMES


def _is_sum(n: fx.Node) -> bool:
    if n.op == "call_function":
        return n.target in _SUMS
    return n.op == "call_method" and n.target in ("add", "add_")


def gate_sites(model: nn.Module, residual: bool = True) -> list[Site]:
    """The convs ManiDP gates (module docstring), in the order the forward calls them. `residual` False: a conv
    whose channels are added into a residual sum keeps every output channel (its input is still gated by `prev`),
    as `--scope internal` keeps the residual stream whole for every other criterion."""
    gm = trace(model, "ManiDP")
    modules = dict(model.named_modules())
    nodes = list(gm.graph.nodes)
    after_conv: set[fx.Node] = set()  # nodes with a conv between them and the image
    for n in nodes:
        if any(a in after_conv or isinstance(_module(modules, a), nn.Conv2d) for a in n.all_input_nodes):
            after_conv.add(n)
    norm_of: dict[fx.Node, fx.Node] = {}  # candidate conv -> the BatchNorm alone reading its output
    for n in nodes:
        conv = _module(modules, n)
        if not isinstance(conv, nn.Conv2d) or isinstance(conv, DynamicModule) or conv.groups != 1:
            continue
        users = list(n.users)
        if n in after_conv and len(users) == 1 and isinstance(_module(modules, users[0]), nn.BatchNorm2d):
            if users[0].args[:1] == (n,):
                norm_of[n] = users[0]

    def into_sum(bn: fx.Node) -> bool:
        """Whether the BatchNorm's output reaches a residual sum through ReLUs and pools."""
        todo, seen = [bn], set()
        while todo:
            n = todo.pop()
            for u in n.users:
                if _is_sum(u):
                    return True
                if u not in seen and _keeps_zero_channels(modules, u):
                    seen.add(u)
                    todo.append(u)
        return False

    def gating_input(conv: fx.Node) -> fx.Node | None:
        """The candidate conv whose BatchNorm feeds `conv`'s input through ReLUs and max-pools only."""
        n = conv.args[0] if conv.args else None
        while isinstance(n, fx.Node) and _keeps_zero_channels(modules, n) and n.args:
            n = n.args[0]
        return next((c for c, b in norm_of.items() if b is n), None)

    own = {c: not into_sum(b) for c, b in norm_of.items()}
    sites, gated = [], set()
    for c, b in norm_of.items():  # graph order: a conv's `prev` is decided before it
        source = gating_input(c)
        prev = source if source is not None and own[source] and source in gated else None
        if own[c] or prev is not None:
            out_gated = own[c] or residual
            if out_gated:  # only a conv whose outputs are gated can gate the next one's input
                gated.add(c)
            relu = any(_is_relu(modules, u) for u in b.users)
            prev_name = str(prev.target) if prev is not None else None
            sites.append(Site(str(c.target), str(b.target), prev_name, relu, out_gated))
    return sites


def block_plan(block: nn.Module, conv1: str, conv2: str) -> BlockPlan | None:
    """The compact plan of `block` whose children `conv1` and `conv2` are gated (conv2 gated by conv1), when its
    forward is exactly relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)); else None."""
    try:
        gm = trace(block)
    except UnsupportedGraph:
        return None
    modules = dict(block.named_modules())
    graph = [n for n in gm.graph.nodes if n.op != "output"]
    (out,) = [n for n in gm.graph.nodes if n.op == "output"]
    placeholders = [n for n in graph if n.op == "placeholder"]
    if len(placeholders) != 1:
        return None
    x = placeholders[0]

    def only_user(n: fx.Node) -> fx.Node | None:
        users = list(n.users)
        return users[0] if len(users) == 1 else None

    c1 = next((n for n in graph if n.op == "call_module" and n.target == conv1), None)
    chain = [c1]
    for _ in range(5):  # bn1, relu, conv2, bn2, the sum
        chain.append(only_user(chain[-1]) if chain[-1] is not None else None)
    if None in chain or c1.args[:1] != (x,):
        return None
    _, b1, r1, c2, b2, total = chain
    if not (isinstance(_module(modules, b1), nn.BatchNorm2d) and _is_relu(modules, r1) and c2.target == conv2):
        return None
    if not (isinstance(_module(modules, b2), nn.BatchNorm2d) and _is_sum(total) and len(total.args) == 2):
        return None
    r2 = only_user(total)
    if r2 is None or not _is_relu(modules, r2) or out.args[0] is not r2 or b2 not in total.args:
        return None
    s = total.args[1] if total.args[0] is b2 else total.args[0]
    shortcut, path = None, []
    while s is not x:  # the shortcut: x, or one child module (a Sequential is traced through, child by child)
        if not isinstance(s, fx.Node) or s.op != "call_module" or len(s.users) != 1 or s.args[1:] or s.kwargs:
            return None
        path.insert(0, str(s.target))
        s = s.args[0]
    if path:
        shortcut = path[0].split(".")[0]
        child = getattr(block, shortcut)
        names = [shortcut] if len(path) == 1 and path[0] == shortcut else None
        if names is None and type(child) is nn.Sequential:
            names = [f"{shortcut}.{k}" for k in child._modules]
        if path != names:
            return None
    if len(graph) != 1 + 7 + len(path):  # x, the main path and the shortcut: nothing else
        return None
    return BlockPlan(conv1, str(b1.target), conv2, str(b2.target), shortcut)


def features_plan(seq: nn.Sequential, gated: Mapping[str, Site], prefix: str) -> bool:
    """Whether the plain nn.Sequential `seq` (module name `prefix`) runs compact: it holds gated convs, each followed
    by its own BatchNorm and a ReLU, and each gated (`prev`) exactly by the gated conv whose kept channels the compact
    path carries to it (the one before it in `seq` with only ReLUs and max-pools between), or by none."""
    children = list(seq.named_children())
    carried, found = None, False  # carried: the gated conv whose kept channels reach the current child
    i = 0
    while i < len(children):
        name, child = children[i]
        site = gated.get(f"{prefix}.{name}" if prefix else name)
        if site is None:
            if not isinstance(child, (nn.ReLU, nn.MaxPool2d)):
                carried = None
            i += 1
            continue
        after = children[i + 1 : i + 3]
        bn_name = f"{prefix}.{after[0][0]}" if prefix and after else (after[0][0] if after else None)
        if len(after) < 2 or bn_name != site.bn or not isinstance(after[1][1], nn.ReLU) or site.prev != carried:
            return False
        carried, found = site.conv, True
        i += 3
    return found
