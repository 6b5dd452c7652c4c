"""Structural surgery: channel groups from one recorded forward pass, and physical removal of channels."""

from prune_cli.surgery.apply import apply_overrides, prune
from prune_cli.surgery.cost import CostModel
from prune_cli.surgery.graph import analyse, analysing, channel_groups, register_pass_through_leaf

__all__ = [
    "CostModel", "analyse", "analysing", "apply_overrides", "channel_groups", "prune", "register_pass_through_leaf"
]  # fmt: skip
