"""Sensitivity sweep cost (issue 5). Prints figures; not a test.

Figure: sweep wall time / (number of evaluations x wall time of one full evaluation of the calibration images).
A sweep that re-ran the whole model for every (group, level, trial) would score about 1.0 plus its overhead; the
graph cut (criteria/sensitivity.py) runs the layers before a damaged group once per batch, so the figure drops
below 1 where groups sit deep in the network. Goal: <= 1.1, and < 1 where the reuse pays.

The full-evaluation time is the median of `--repeats` timed passes; the sweep time is the criterion's whole
`run` (tracing, baseline pass, sweep, alpha bisection). `--naive` also times the sweep without the cut. On a
shared machine wall times drift with other processes' load; the same figure from process CPU time (one thread)
is printed next to it as a check.
Untrained models and real digits training images (1x32x32): accuracy does not change the cost.
Usage: python benchmarks/sensitivity.py [--models resnet20,vgg11] [--images 256] [--trials 1] [--naive]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import models
from prune_cli.api import CalibData, Context, Target, get_criterion
from prune_cli.data import splits as D
from prune_cli.selection.plan import groups_in_scope
from prune_cli.surgery import channel_groups


def full_eval_s(model, calib: CalibData, batch_size: int, repeats: int) -> tuple[float, float]:
    """Median (wall, CPU) seconds of one pass over the calibration images."""
    walls, cpus = [], []
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first pass warms up the allocator, not counted
            t0, c0 = time.perf_counter(), time.process_time()
            for x, _ in calib.batches(batch_size):
                model(x)
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
    return statistics.median(walls[1:]), statistics.median(cpus[1:])


def bench(name: str, args, calib: CalibData) -> None:
    model = models.create_model(name, num_classes=10, in_channels=1).eval()
    example = calib.x[:1]
    groups = channel_groups(model, example)
    ctx = Context(model, tuple(groups_in_scope(groups, args.scope)), tuple(groups), example, 10,
                  Target("macs", 0.5), calib=calib)  # fmt: skip
    cls = get_criterion("sensitivity")
    levels = tuple(float(v) for v in args.levels.split(","))
    t_before = full_eval_s(model, calib, args.batch_size, args.repeats)
    runs = []
    for reuse in (True, False) if args.naive else (True,):
        opts = cls.Options(levels=levels, trials=args.trials, batch_size=args.batch_size, reuse=reuse)
        t0, c0 = time.perf_counter(), time.process_time()
        result = cls(opts).run(ctx)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        runs.append((reuse, wall, cpu, result.extra["evaluations"], len(result.extra["sensitivity"])))
    # timed before and after the sweeps: the machine may be shared, so take the faster of the two medians
    t_after = full_eval_s(model, calib, args.batch_size, args.repeats)
    t_full, c_full = min(t_before[0], t_after[0]), min(t_before[1], t_after[1])
    for reuse, wall, cpu, n, swept in runs:  # swept: the groups the sweep damages (layers=conv: conv groups only)
        print(f"{name:9s} scope {args.scope:8s} {'cut ' if reuse else 'whole'}  groups {swept:2d}  "
              f"evaluations {n:4d}  full eval {t_full * 1e3:7.1f} ms  sweep {wall:7.2f} s  "
              f"figure {wall / (n * t_full):.3f}  (CPU-time figure {cpu / (n * c_full):.3f})", flush=True)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet20,vgg11")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--levels", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9")
    p.add_argument("--trials", type=int, default=1)
    p.add_argument("--scope", default="internal", choices=("internal", "all"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--naive", action="store_true", help="also time the sweep without the graph cut")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    splits = D.make_splits(D.load_dataset("digits"), seed=0)
    # the digits calib split holds only 143 images; for timing, training images serve as well
    calib = CalibData(D.to_float(splits.train.x[: args.images], splits), splits.train.y[: args.images])
    print(f"{len(calib)} digits calibration images 1x32x32, batch {args.batch_size}, {args.threads} thread(s), "
          f"levels {args.levels}, trials {args.trials}")  # fmt: skip
    for name in args.models.split(","):
        bench(name, args, calib)


if __name__ == "__main__":
    main()
