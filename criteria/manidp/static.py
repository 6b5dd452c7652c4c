"""ManiDP, dynamic to static (`--opt static_below=F`): after training, the channels that fewer than a share F of the
calibration inputs keep are removed physically by the surgery engine; the other channels stay gated.

Only channel groups whose every producer is a gated conv and which feed no residual sum can go: a ResNet block's
conv1 channels (conv1 out, bn1, conv2 in) and a VGG gated conv's (conv out, BatchNorm, next layer's input). A
block's conv2 channels share the residual stream with the shortcut, so they stay gated (batch-1 inference skips
them already). A channel whose mask is 0 for an input contributes exactly 0 downstream (masked BatchNorm output,
then ReLU, then the next conv and the next gate's pooling), so on inputs that never keep a removed channel the
smaller model computes what the gated one did.

The gates keep their trained hidden width; each loses the rows of its first layer (w1) that read removed input
channels, and the columns of its second layer (w2, b2) that scored removed output channels. The model file records
the hidden widths in its dynamic config, so `rebuild` recreates the same gates.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from criteria.manidp import (
    GatedBlock,
    GatedConv2d,
    GatedFeatures,
    InputGatedConv2d,
    conv_sharing_weights,
    wrap,
)
from prune_cli.api import ChannelGroup
from prune_cli.api.dynamic import keep_masks
from prune_cli.api.graph import CostModel, prune


def strip(model: nn.Module) -> nn.Module:
    """A plain (ungated) copy of a gated model: each GatedConv2d back to an nn.Conv2d holding a copy of its weights,
    the BatchNorm masks removed, gated blocks and VGG features back to their base classes; the gates dropped."""
    wrapped = (GatedConv2d, InputGatedConv2d)
    for conv in (m for m in model.modules() if isinstance(m, wrapped)):  # per-forward records (some are closures)
        if isinstance(conv, GatedConv2d):
            conv.last_saliency = conv.last_mask = conv.last_kept = conv.last_feature = None
        conv.clear_record()
        conv.__dict__.pop("_folded", None)
    plain = copy.deepcopy(model)
    plain.__dict__.pop("prune_cli_dynamic", None)
    for name, conv in [(n, m) for n, m in plain.named_modules() if isinstance(m, wrapped)]:
        parent_name, _, attr = name.rpartition(".")
        setattr(plain.get_submodule(parent_name), attr, conv_sharing_weights(conv))
    for m in plain.modules():
        if isinstance(m, nn.BatchNorm2d):
            hooks = m._forward_hooks
            for key in [k for k, h in hooks.items() if isinstance(getattr(h, "__self__", None), GatedConv2d)]:
                del hooks[key]
        if isinstance(m, GatedBlock):
            m.__class__ = m.base_class
            m.__dict__.pop("_compact", None)
        elif type(m) is GatedFeatures:
            m.__class__ = nn.Sequential
    return plain


def removable(groups: list[ChannelGroup], freq: Mapping[str, Tensor], below: float) -> dict[str, Tensor]:
    """{group id: kept channel indices} for the `groups` (the plain model's) that lose channels: those whose
    producers are all gated convs (their names in `freq`: per channel the share of inputs that kept it, (C,)) and
    that feed no residual sum; a channel goes when every producer keeps it for fewer than `below` of the inputs. At
    least one channel stays."""
    keep = {}
    for g in groups:
        producers = g.producers
        if not g.prunable or g.residual or not producers or any(m.offset for m in g.members):
            continue
        if any(m.kind != "conv_out" or m.module not in freq or len(freq[m.module]) != g.size for m in producers):
            continue
        rare = torch.stack([freq[m.module] < below for m in producers]).all(0)
        if not rare.any():
            continue
        kept = torch.nonzero(~rare).squeeze(1)
        if not len(kept):  # never remove a whole group: keep its most often kept channel
            kept = torch.stack([freq[m.module] for m in producers]).amax(0).argmax().view(1)
        keep[g.id] = kept
    return keep


@torch.no_grad()
def to_static(
    model: nn.Module, calib_x: Tensor, below: float, example_input: Tensor, config: Mapping[str, Any]
) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
    """(gated smaller model, its plain static copy, report) after removing the channels that fewer than `below` of
    the calibration inputs `calib_x` (N, C, H, W) keep. `config` is the gated model's rebuild config; the returned
    model's (`prune_cli_dynamic`) adds the gates' hidden widths. Returns `model` itself when nothing goes."""
    named = {n: m for n, m in model.named_modules() if isinstance(m, GatedConv2d)}
    freq = {n: k.float().mean(0) for n, k in keep_masks(model, calib_x).items()}
    plain = strip(model)
    cost = CostModel(plain, example_input)
    keep = removable(cost.groups, freq, below)
    groups = {g.id: g for g in cost.groups}
    out_idx: dict[str, Tensor] = {}
    in_idx: dict[str, Tensor] = {}
    for gid, kept in keep.items():
        for m in groups[gid].members:
            if m.kind == "conv_out":
                out_idx[m.module] = kept
            elif m.kind == "conv_in":
                in_idx[m.module] = kept
    removed = sum(groups[gid].size - len(k) for gid, k in keep.items())
    report: dict[str, Any] = {
        "below": below, "calibration_inputs": len(calib_x), "removed_channels": removed,
        "gated_channels": sum(c.out_channels for c in named.values()),
    }  # fmt: skip
    if not keep:
        small, result = plain, model
    else:
        small = prune(plain, example_input, keep, groups=list(groups.values()))
        hidden = {n: int(c.gate.w1.shape[1]) for n, c in named.items()}
        new_config = {**config, "hidden": hidden}
        result = wrap(copy.deepcopy(small), new_config)
        for name, new in ((n, m) for n, m in result.named_modules() if isinstance(m, GatedConv2d)):
            old = named[name].gate
            w1, w2, b2 = old.w1, old.w2, old.b2
            if name in in_idx:
                w1 = w1.index_select(0, in_idx[name].to(w1.device))
            if name in out_idx:
                idx = out_idx[name].to(w2.device)
                w2, b2 = w2.index_select(1, idx), b2.index_select(0, idx)
            new.gate.w1.copy_(w1)
            new.gate.w2.copy_(w2)
            new.gate.b2.copy_(b2)
            new.gate.threshold.copy_(old.threshold)
        result.prune_cli_dynamic = new_config
        for attr in ("prune_cli_arch",):
            if hasattr(model, attr):
                setattr(result, attr, getattr(model, attr))
                setattr(small, attr, getattr(model, attr))
    result.train(model.training)
    small.eval()
    macs, params = cost.cost({gid: len(kept) for gid, kept in keep.items()})  # conv and linear, as metrics counts
    report.update(macs=macs, params=params)
    return result, small, report
