"""Surgery benchmarks (issue 4). Prints figures; not a test.

1. Wall time of removing the same plan, prune-cli vs Torch-Pruning 1.6.1 (each including its own graph analysis),
   on resnet56, vgg16 and torchvision resnet50 (goal: ours <= 0.5x theirs). Torch-Pruning prunes in place, so it is
   handed a copy; ours copies inside prune(). The ratio leaves that copy out, and is printed again with it.
2. Measured CPU latency speed-up divided by MACs speed-up for resnet56 and vgg16 pruned 2x (scope all, uniform
   L1), at batch 1 and 64 (goal >= 0.9); the models are timed in turns. Again with `fast_widths` (timed at batch
   64): oneDNN's kernels make some widths slower than wider ones, and this rounds each group away from them.
3. The channel analysis alone at 32x32 and 224x224 inputs, against Torch-Pruning's dependency graph: ours does not
   compute the convolutions, so its time does not grow with the image.
Usage: python benchmarks/surgery.py [--threads 2] [--repeats 3] [--device cuda]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

import models
from prune_cli.api import Context, Target, get_criterion
from prune_cli.metrics import count_macs, measure_latency
from prune_cli.run.environment import machine
from prune_cli.selection.plan import groups_in_scope, select
from prune_cli.surgery import channel_groups, prune

FAST_AT = 64  # the batch size the fast widths are timed at


def half_plan(model, x):
    groups = channel_groups(model, x)
    return groups, {g.id: torch.arange(g.size // 2) for g in groups_in_scope(groups, "all")}


def ours(model, x, plan) -> tuple[float, float]:
    """(analysis, removal) seconds: channel groups from one recorded forward pass, then the removal on a copy."""
    t0 = time.perf_counter()
    groups = channel_groups(model, x)
    t1 = time.perf_counter()
    prune(model, x, plan, groups=groups)
    return t1 - t0, time.perf_counter() - t1


def theirs(model, x, groups, plan) -> tuple[float, float, float]:
    """(analysis, removal, copy) seconds for Torch-Pruning: its dependency graph, then its in-place removal, and
    apart the deepcopy that leaves the original untouched as ours does (ours copies inside prune())."""
    import torch_pruning as tp

    t0 = time.perf_counter()
    m = copy.deepcopy(model)
    t1 = time.perf_counter()
    dg = tp.DependencyGraph().build_dependency(m, example_inputs=x, verbose=False)
    t2 = time.perf_counter()
    modules = dict(m.named_modules())
    by_id = {g.id: g for g in groups}
    for gid, idx in plan.items():
        producer = modules[by_id[gid].producers[0].module]
        fn = tp.prune_conv_out_channels if isinstance(producer, nn.Conv2d) else tp.prune_linear_out_channels
        removed = sorted(set(range(by_id[gid].size)) - set(idx.tolist()))
        dg.get_pruning_group(producer, fn, idxs=removed).prune()
    return t2 - t1, time.perf_counter() - t2, t1 - t0


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _median_ms(runs: list[tuple[float, ...]]) -> tuple[float, ...]:
    """Medians (ms) of the first two parts' sum (analysis + removal) and of each part over repeated runs."""
    return tuple(statistics.median(v) * 1e3 for v in ([r[0] + r[1] for r in runs], *zip(*runs, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="where section 2 runs and times the models (cpu, cuda)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    print("\n1. surgery wall time, same plan (half of every prunable group), median of", args.repeats)
    for name in ("resnet56", "vgg16", "torchvision:resnet50"):
        model = models.create_model(name, num_classes=10).eval()
        x = torch.randn(1, 3, 32, 32)
        groups, plan = half_plan(model, x)
        runs_a, runs_b = [], []
        for _ in range(args.repeats):  # alternate, so that a busy moment hits both
            runs_a.append(ours(model, x, plan))
            runs_b.append(theirs(model, x, groups, plan))
        a, b = _median_ms(runs_a), _median_ms(runs_b)
        print(f"  {name:21s} ours {a[0]:6.1f} ms ({a[1]:5.1f} analysis + {a[2]:5.1f} removal)  Torch-Pruning "
              f"{b[0]:6.1f} ms ({b[1]:5.1f} + {b[2]:5.1f})  ratio {a[0] / b[0]:.2f} (goal <= 0.5), "
              f"removal alone {a[2] / b[2]:.2f}; with Torch-Pruning's copy ({b[3]:.1f} ms) timed too "
              f"{a[0] / (b[0] + b[3]):.2f}")  # fmt: skip

    where = f"{args.threads} threads" if device.type == "cpu" else str(device)
    print(f"\n2. latency speed-up / MACs speed-up, pruned 2x (uniform L1, scope all), {where}, 32x32;")
    print(f"   'fast widths': the same, each group rounded to a width faster than every wider one at batch {FAST_AT}")
    for name in ("resnet56", "vgg16"):
        model = models.create_model(name, num_classes=10).eval().to(device)
        x = torch.randn(1, 3, 32, 32, device=device)
        groups = channel_groups(model, x)
        scoped = groups_in_scope(groups, "all")
        ctx = Context(model, tuple(scoped), tuple(groups), x, 10, Target("macs", 0.5))
        scores = get_criterion("l1")().run(ctx)
        base_macs = count_macs(model, x)
        pruned = {}
        for label, batch in (("uniform", 0), ("fast widths", FAST_AT)):
            t0 = time.perf_counter()
            sel = select(model, x, scoped, scores, Target("macs", 0.5), latency_batch=batch)
            pruned[label] = prune(model, x, sel.keep, groups=groups)
            print(f"  {name:9s} {label:11s} widths {sorted({len(k) for k in sel.keep.values()})}, selected in "
                  f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
        for batch in (1, 64):  # in turns, so that the machine's drift hits all three: medians of 3 turns each
            timed = (model, *pruned.values())
            turns = [[measure_latency(m, (3, 32, 32), batch, max_seconds=1).median_ms for m in timed] for _ in range(3)]
            base_ms, *after_ms = (statistics.median(t) for t in zip(*turns, strict=True))
            for (label, p), ms in zip(pruned.items(), after_ms, strict=True):
                mac_speedup = base_macs / count_macs(p, x)
                ratio = base_ms / ms / mac_speedup
                print(f"  {name:9s} {label:11s} batch {batch:3d}: {base_ms:8.2f} -> {ms:8.2f} ms  latency x"
                      f"{base_ms / ms:.2f}  MACs x{mac_speedup:.2f}  ratio {ratio:.2f} (goal >= 0.9)")  # fmt: skip

    import torch_pruning as tp

    print(f"\n3. channel analysis vs input size, torchvision resnet50, median of {args.repeats}")
    model = models.create_model("torchvision:resnet50", num_classes=10).eval()
    for size in (32, 224):
        x = torch.randn(1, 3, size, size)
        runs_a, runs_b = [], []
        for _ in range(args.repeats):  # the analyses alone: neither tool copies or prunes here
            runs_a.append(_seconds(lambda x=x: channel_groups(model, x)))
            runs_b.append(
                _seconds(lambda x=x: tp.DependencyGraph().build_dependency(model, example_inputs=x, verbose=False))
            )
        a, b = (statistics.median(r) * 1e3 for r in (runs_a, runs_b))
        print(
            f"  {size:3d}x{size:<3d} ours {a:6.1f} ms  Torch-Pruning's dependency graph {b:6.1f} ms  ratio {a / b:.2f}"
        )


if __name__ == "__main__":
    main()
