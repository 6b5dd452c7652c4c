"""Print each paper's headline claim next to the figure measured at the nearest MACs target of a fine-tuned grid.

The claims are the papers' own published figures (or, where marked, a reproduction's or a reviewer's reading), as
collected in the method notes; the measured side is read from the folder's `leaderboard.csv`, which
`prune-cli report` rebuilds from the records. Nothing measured is written here.

Usage: python experiments/results/paper_claims.py experiments/results/fmnist-resnet20/compare-ft resnet
       python experiments/results/paper_claims.py experiments/results/fmnist-vgg/compare-ft vgg
"""

import sys
from pathlib import Path

import pandas as pd

# criterion -> family -> (claim, its FLOPs cut or None, its top-1 change in pt as written, fine-tuned in the paper?)
CLAIMS = {
    "l1": {
        "resnet": ("CIFAR-10 ResNet-56 (pruned-B): 93.04 -> 93.06%", 0.276, "+0.02", True),
        "vgg": ("CIFAR-10 VGG-16 (pruned-A): 93.25 -> 93.40%", 0.342, "+0.15", True),
    },
    "sensitivity": {
        "any": ("no accuracy figure published; claim: sensitivity-chosen widths beat uniform ones", None, "", True),
    },
    "similarity": {
        "any": ("ImageNet ResNet-50: -30% FLOPs, top-1 at or above the base (abstract)", 0.30, ">= 0", True),
    },
    "lasso": {
        "resnet": ("CIFAR-10 ResNet-56 2x: 92.80 -> 91.80% (Torch-Pruning's reproduction)", 0.50, "-1.00", True),
        "vgg": ("ImageNet VGG-16 2x: top-5 unchanged after fine-tuning (as recalled in the notes)", 0.50, "", True),
    },
    "dcs": {
        "any": ("CIFAR-100 VGG-19: 1.72x speed-up for -2.83 pt (a reviewer's reading)", 0.419, "-2.83", False),
    },
    "haste": {
        "resnet": ("CIFAR-10 ResNet-34: -46.7% FLOPs for -1.25 pt, data-free", 0.467, "-1.25", False),
        "vgg": ("CIFAR-10 VGG-19-BN: -38.8% FLOPs for -1.63 pt (a review's reading)", 0.388, "-1.63", False),
    },
    "manidp": {
        "resnet": ("CIFAR-10 ResNet-20: 92.22 -> 92.05% (400 epochs)", 0.542, "-0.17", True),
        "vgg": ("no VGG figure; CIFAR-10 ResNet-56: 93.70 -> 93.64%", 0.624, "-0.06", True),
    },
}


def pt(x: float) -> str:
    return f"{x:+.2f}"


def main(folder: Path, family: str) -> None:
    board = pd.read_csv(folder / "leaderboard.csv")
    base = 100 * float(board["base_top1"].iloc[0])
    print(f"Base: {base:.2f}% top-1. Ours: the mean of the seeds at the MACs target nearest the paper's cut.")
    print()
    print(
        "| criterion | paper's claim | paper's cut | paper's change (pt) | our target | ours before FT (change, pt) | "
        "ours after FT (change, pt) |"
    )
    print("|---|---|---|---|---|---|---|")
    for criterion, by_family in CLAIMS.items():
        claim, cut, change, tuned = by_family.get(family, by_family.get("any"))
        rows = board[board["criterion"] == criterion]
        if rows.empty:
            print(f"| {criterion} | {claim} | | | not run yet | | |")
            continue
        target = min(rows["target"], key=lambda t: abs(t - (cut if cut is not None else 0.5)))
        row = rows[rows["target"] == target].iloc[0]
        before = row["top1_before_ft_mean"]
        before_s = "(trains)" if pd.isna(before) else f"{100 * before:.2f}% ({pt(100 * before - base)})"
        after = 100 * row["top1_mean"]
        print(
            f"| {criterion} | {claim} | {'' if cut is None else f'-{100 * cut:.1f}%'} | "
            f"{change}{'' if tuned else ', no fine-tuning'} | "
            f"-{100 * target:.0f}% (reached -{100 * row['macs_removed']:.1f}%) | {before_s} | "
            f"{after:.2f}% ({pt(after - base)}) |"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
