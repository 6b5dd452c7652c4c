"""How far can any choice of widths go? (issue 4's latency goal). Prints figures; not a test.

The latency goal asks resnet56 pruned 2x to run at least 0.9 x 2 times faster. `benchmarks/surgery.py` times the
widths prune-cli picks (uniform, and fast widths). This script asks whether other widths would reach the goal on
this machine: it enumerates every stage-uniform width allocation of a CIFAR ResNet (one width for the block-internal
channels and one for the residual channels of each stage, each from that stage's width options below) whose MACs
speed-up lies in [--min-speedup, --max-speedup], draws --samples of them at random, adds the uniform allocation,
and times each of them against the base model, back to back, at each batch size (medians of --turns pairs). It
prints the best, median and uniform ratio (latency speed-up / MACs speed-up). The best of many noisy timings is
biased upward, so the best --confirm allocations are timed again, and that second figure is the one to quote.

Width options per stage of C channels: C // 2, the uniform width at 2x (about 0.7 C), and every multiple of 8 from
C // 2 to C.
Usage: python benchmarks/width_search.py [--model resnet56] [--samples 40] [--batches 1 64] [--threads 2]
       [--device cuda]
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics

import torch

import models
from prune_cli.metrics import count_macs, measure_latency
from prune_cli.run.environment import machine
from prune_cli.selection.plan import groups_in_scope
from prune_cli.surgery import CostModel, channel_groups, prune


def stage_of(group_id: str) -> int:
    """Stage (0-based) of a CIFAR ResNet's group: `conv1` (the stem) feeds stage 0, `layerS...` is stage S-1."""
    return 0 if group_id == "conv1" else int(group_id.split(".")[0].removeprefix("layer")) - 1


def uniform_width(size: int) -> int:
    """The width a uniform cut to half the MACs keeps (both sides of each conv shrink by sqrt 2)."""
    return round(size / 2**0.5)


def width_options(size: int) -> list[int]:
    return sorted({size // 2, uniform_width(size), *range(8 * -(-size // 16), size + 1, 8)})


def paired_ratio(base: torch.nn.Module, pruned: torch.nn.Module, mac_speedup: float, batch: int, turns: int) -> float:
    """Latency speed-up / MACs speed-up: the median over turns of base time / pruned time, the two timed back to
    back in each turn (this VM's speed drifts over seconds)."""
    seconds = 0.2 if batch == 1 else 0.4
    pairs = [[measure_latency(m, (3, 32, 32), batch, max_seconds=seconds).median_ms for m in (base, pruned)]
             for _ in range(turns)]  # fmt: skip
    return statistics.median(b / p for b, p in pairs) / mac_speedup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet56", help="a CIFAR ResNet of models.py (resnet20 ... resnet110)")
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--confirm", type=int, default=3, help="the best allocations timed again")
    parser.add_argument("--min-speedup", type=float, default=1.97)
    parser.add_argument("--max-speedup", type=float, default=2.08)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="where the models run and are timed (cpu, cuda)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")

    model = models.create_model(args.model, num_classes=10).eval().to(device)
    x = torch.randn(1, 3, 32, 32, device=device)
    groups = channel_groups(model, x)
    scoped = groups_in_scope(groups, "all")
    cost = CostModel(model, x)
    n_stages = 1 + max(stage_of(g.id) for g in scoped)
    sizes = [next(g.size for g in scoped if stage_of(g.id) == s) for s in range(n_stages)]
    options = [width_options(size) for size in sizes]
    print(f"{args.model}: stage widths {sizes}, options {options}")

    def kept(alloc: tuple[int, ...]) -> dict[str, int]:
        """alloc: internal widths of each stage, then residual widths of each stage."""
        return {g.id: alloc[stage_of(g.id) + (n_stages if g.residual else 0)] for g in scoped}

    base_macs = cost.base("macs")
    near = [
        alloc
        for alloc in itertools.product(*options, *options)
        if args.min_speedup <= base_macs / cost.metric(kept(alloc), "macs") <= args.max_speedup
    ]
    uniform = tuple(uniform_width(s) for s in sizes) * 2
    drawn = random.Random(args.seed).sample(near, min(args.samples, len(near)))
    allocs = [uniform] + [a for a in drawn if a != uniform]
    where = f"{args.threads} threads" if device.type == "cpu" else str(device)
    print(f"{len(near)} allocations with MACs speed-up in [{args.min_speedup}, {args.max_speedup}]; timing "
          f"{len(allocs)} (the uniform one {uniform} first), {where}")  # fmt: skip
    pruned = [prune(model, x, {gid: torch.arange(k) for gid, k in kept(a).items()}, groups=groups) for a in allocs]
    dense_macs = count_macs(model, x)
    speedups = [dense_macs / count_macs(p, x) for p in pruned]

    for batch in args.batches:
        ratios = [paired_ratio(model, p, s, batch, args.turns) for p, s in zip(pruned, speedups, strict=True)]
        order = sorted(range(len(allocs)), key=lambda i: -ratios[i])
        print(
            f"\nbatch {batch}: ratio best {ratios[order[0]]:.2f}, median {statistics.median(ratios):.2f}, uniform "
            f"{ratios[0]:.2f} (goal >= 0.9); the best {args.confirm} timed again, {2 * args.turns + 1} turns:"
        )
        for i in order[: args.confirm]:  # a fresh measurement, free of the selection's upward bias
            again = paired_ratio(model, pruned[i], speedups[i], batch, 2 * args.turns + 1)
            print(f"  {allocs[i]}  MACs x{speedups[i]:.2f}  ratio {ratios[i]:.2f}, again {again:.2f}")


if __name__ == "__main__":
    main()
