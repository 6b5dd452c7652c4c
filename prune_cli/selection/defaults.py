"""The selection settings' defaults, in one place (no torch here: the CLI's option declarations read them too).
`prune`/`score` options, an experiment's keys and a run's `PruneJob` take their defaults from `SELECTION`."""

from dataclasses import dataclass


@dataclass(frozen=True)
class SelectionDefaults:
    mode: str = "uniform"  # one ratio per group (uniform) or one threshold over normalised scores (global)
    scope: str = "internal"  # internal: never prune a channel that feeds a residual sum
    round_to: int = 1
    fast_widths: int = 0  # batch size at which selection times widths (0: off)
    max_ratio: float = 0.9  # the most of one group that may be removed
    calib_images: int = 1024


SELECTION = SelectionDefaults()
