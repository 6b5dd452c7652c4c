"""The model's graph, for criteria: the project's one fx trace and graph split, channel groups, physical removal,
the cost model, and which BatchNorm reads a layer's output.

The context already offers these for its own model (`ctx.all_groups`, `ctx.prune`, `ctx.cost_model()`); the
functions here serve a criterion that works on another model: its own copy with other weights, a model it pruned
step by step, or a freshly built one (a dynamic criterion's `rebuild`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from prune_cli.surgery import CostModel, channel_groups, prune
from prune_cli.surgery.split import split, trace, writes_in_place

__all__ = ["CostModel", "channel_groups", "following_norms", "prune", "split", "trace", "writes_in_place"]


@torch.no_grad()
def following_norms(model: nn.Module, example_input: Tensor) -> dict[str, str]:
    """{conv/linear name: name of the BatchNorm that reads its output directly}, found by one eval-mode forward of
    `example_input` (1, C, H, W) with hooks."""
    modules = dict(model.named_modules())
    # id -> (name, output): holding the output keeps its id from being reused by a later tensor (densenet's
    # concatenations once matched a freed conv output's id, giving that conv a BatchNorm it does not feed)
    outputs: dict[int, tuple[str, Tensor]] = {}
    found: dict[str, str] = {}
    handles = []
    for name, m in modules.items():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            handles.append(
                m.register_forward_hook(lambda _m, _a, out, name=name: outputs.__setitem__(id(out), (name, out)))
            )
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):

            def pre(_m, args, name=name):
                if id(args[0]) in outputs:
                    found[outputs[id(args[0])][0]] = name

            handles.append(m.register_forward_pre_hook(pre))
    was_training = model.training
    try:
        model.eval()
        model(example_input)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return found
