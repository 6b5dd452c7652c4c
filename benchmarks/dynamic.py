"""Dynamic-method benchmarks (issue 7). Prints figures; not a test.

1. `latency` (default): HASTE and ManiDP at batch 1 on resnet20 and resnet56: measured latency gain divided by the
   per-input MAC gain (goal >= 0.5), and each method's own overhead as a share of its MACs.
   - Model: `--model FILE` (a trained prune-cli model file; inputs are its test images) or random-init models of
     `--arch` on 3x32x32 with smooth-noise inputs (HASTE's data-free search inputs). Random init is fine for
     timing: HASTE's cost depends on the activations' redundancy, not on accuracy.
   - HASTE: L found by its own search for `--target` (MACs reduction), reduced per-tile path at batch 1.
   - ManiDP: `--manidp FILE` (a model file written by `prune --criterion manidp`, trained from `--model`), or
     untrained gates (official Kaiming init, seed 0) whose thresholds are set as the schedule's last step sets
     them: per layer the k-th largest mean saliency over the inputs, k = ceil(t C_l), t = `--remain`.
   - ManiDP's real-latency path, the dynamic-to-static removal (`prune --criterion manidp --opt static_below=F`,
     criteria/manidp/static.py): the channels that fewer than a share `--static-below` of the inputs keep are removed
     physically. Timed: the gated model after removal, and its static copy without gates (what the static part alone
     runs at), next to the gated model before removal.
   - Two dense baselines: the model as it is, and the same with BatchNorm folded into the convs
     (torch.fx.experimental.optimization.fuse), since ManiDP's compact batch-1 path folds BatchNorm too.
   All models are timed alternately round by round on the same inputs (cycled), median over all passes, on
   `--device` (cpu, or cuda: each pass between two synchronisations).
2. `conv-scaling`: why per-input channel skipping gains little latency at batch 1 on a CPU. Batch-1 time of one 3x3
   conv at ResNet-20's stage widths (16 at 32x32, 32 at 16x16, 64 at 8x8) and VGG's (128 at 16x16, 256 at 8x8,
   512 at 4x4) when only the output channels shrink (a gated block's conv1, whose input is the full block input),
   when both shrink (its conv2, or a VGG conv after a gated one), and the one-pass gather of the kept filters that
   a per-input choice of channels has to pay on every input.
3. `haste-accuracy --model FILE`: HASTE at several MACs targets on the model's full test set: top-1, per-input MACs
   (mean, std), overhead; `--out` writes the JSON.

Usage: python benchmarks/dynamic.py [latency|conv-scaling|haste-accuracy] [--threads 2] [--model FILE [--manidp FILE]]
       [--arch resnet20 resnet56] [--device cpu|cuda] [--static-below 0.01]
Smoke run (a few seconds, figures meaningless): python benchmarks/dynamic.py --smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from torch.fx.experimental.optimization import fuse

import models
from criteria import haste, manidp
from criteria.manidp import static as manidp_static
from criteria.manidp import train as manidp_train
from prune_cli.api import Context, Target
from prune_cli.api.dynamic import forward_with_macs, per_input_macs
from prune_cli.data import splits as D
from prune_cli.run import loading
from prune_cli.store.modelfile import load_model


def inputs_for(args, arch: str | None = None) -> tuple[torch.nn.Module, torch.Tensor, str, object]:
    if args.model:
        base = load_model(args.model)
        info = base.prune_cli_info
        splits = loading.load_splits(
            info["dataset"], None, model_name=base.prune_cli_arch["factory"],
            normalisation=loading.recorded_normalisation(info, info["dataset"]),
        )  # fmt: skip
        x = D.to_float(splits.test.x[: args.images], splits)
        return base, x, f"{args.model} ({info['dataset']} test images)", splits
    torch.manual_seed(0)
    base = models.create_model(arch).eval()
    x = haste.search_images(args.images, (3, 32, 32), "smooth-noise", torch.Generator().manual_seed(1))
    return base, x, f"random-init {arch}, 3x32x32 smooth noise", None


@torch.no_grad()
def timed(models_: dict[str, torch.nn.Module], x: torch.Tensor, rounds: int, per_round: int) -> dict[str, float]:
    """Median batch-1 forward time (ms) per model; models alternate round by round on the same inputs (on x's
    device; on a GPU each pass is timed between two synchronisations, so it counts the kernels, not their launch)."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {k: [] for k in models_}
    for m in models_.values():
        for i in range(3):
            m(x[i : i + 1])
    for r in range(rounds):
        for name, m in models_.items():
            for i in range(per_round):
                xi = x[(r * per_round + i) % len(x)][None]
                sync()
                t0 = time.perf_counter()
                m(xi)
                sync()
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


UNTRAINED_GATES = {"criterion": "manidp", "gate_init": "kaiming"}  # manidp_model's gates: its rebuild config


def manidp_model(base: torch.nn.Module, x: torch.Tensor, remain: float) -> torch.nn.Module:
    model = manidp.wrap(copy.deepcopy(base), UNTRAINED_GATES, torch.Generator().manual_seed(0)).to(x.device).eval()
    sums = None
    with torch.no_grad():
        for i in range(0, len(x), 64):
            model(x[i : i + 64])
            s = [c.last_saliency.sum(0) for c in manidp.gated_layers(model)]
            sums = s if sums is None else [a + b for a, b in zip(sums, s, strict=True)]
        for conv, total in zip(manidp.gated_layers(model), sums, strict=True):
            conv.gate.threshold.fill_(manidp_train.threshold_for(total / len(x), remain))
    return model


def latency(args) -> None:
    report = []
    for arch in [None] if args.model else args.arch:
        report.append(latency_one(args, arch))
        print()
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


def latency_one(args, arch: str | None) -> dict:
    device = torch.device(args.device)
    base, x, source, _ = inputs_for(args, arch)
    base, x = base.to(device).eval(), x.to(device)
    dense_macs = float(per_input_macs(base, x[:1])[0][0])
    ctx = Context(base, (), (), x[:1], 10, Target("macs", args.target), device=device)
    hashed = haste.Haste().run(ctx)
    if args.manidp:
        gated, gated_label = load_model(args.manidp, device).eval(), f"ManiDP ({args.manidp})"
    else:
        gated, gated_label = manidp_model(base, x, args.remain), f"ManiDP (t={args.remain}, untrained gates)"
    # The dynamic-to-static removal, on the timing inputs (the criterion uses its calibration images).
    config = getattr(gated, "prune_cli_dynamic", None) or UNTRAINED_GATES
    removed, static, removal = manidp_static.to_static(gated, x, args.static_below, x[:1], config)
    removed.eval()
    folded = fuse(copy.deepcopy(base))
    ms = timed({"dense": base, "dense_folded": folded, "haste": hashed.model, "manidp": gated,
                "manidp_removed": removed, "manidp_static": static}, x, args.rounds, args.per_round)  # fmt: skip
    where = f"{torch.get_num_threads()} threads" if device.type == "cpu" else str(device)
    print(f"inputs: {source}; {where}; {len(x)} inputs; batch 1")
    layers = manidp.gated_layers(gated)
    steps = len(layers) * (3 + args.rounds * args.per_round)  # compact steps timed, warm-up included
    slices = sum(c.slice_misses for c in layers)
    print(f"ManiDP: {slices} kept-set weight slices built over {steps} compact steps ({slices / steps:.1%})")
    print(f"dense: {dense_macs / 1e6:.2f} MMACs, {ms['dense']:.3f} ms; BatchNorm folded {ms['dense_folded']:.3f} ms")
    labels = {"haste": f"HASTE (L={hashed.extra['hyperplanes']}, search target -{args.target:.0%})",
              "manidp": gated_label, "manidp_removed": f"{gated_label}, static_below={args.static_below:g}, gated",
              "manidp_static": f"{gated_label}, static_below={args.static_below:g}, static (no gates)"}  # fmt: skip
    print(f"ManiDP static_below={args.static_below:g}: {removal['removed_channels']} of {removal['gated_channels']} "
          f"gated channels removed physically (kept by fewer than {args.static_below:.1%} of the inputs)")  # fmt: skip
    rows = []
    for name, model in (("haste", hashed.model), ("manidp", gated), ("manidp_removed", removed),
                        ("manidp_static", static)):  # fmt: skip
        total, overhead = per_input_macs(model, x)
        mac_gain = 1 - float(total.mean()) / dense_macs
        lat_gain = 1 - ms[name] / ms["dense"]
        folded_gain = 1 - ms[name] / ms["dense_folded"]
        rows.append({
            "method": name, "label": labels[name], "macs_mean": float(total.mean()), "macs_std": float(total.std()),
            "mac_gain": mac_gain, "overhead_share": float(overhead.mean() / total.mean()), "latency_ms": ms[name],
            "latency_gain": lat_gain, "ratio": lat_gain / mac_gain if mac_gain else float("nan"),
            "ratio_vs_folded": folded_gain / mac_gain if mac_gain else float("nan"),
        })  # fmt: skip
        r = rows[-1]
        print(
            f"{labels[name]}: {r['macs_mean'] / 1e6:.2f} +- {r['macs_std'] / 1e6:.2f} MMACs/input "
            f"(gain {mac_gain:+.1%}, overhead {r['overhead_share']:.1%} of MACs); {ms[name]:.3f} ms "
            f"(gain {lat_gain:+.1%}); latency gain / MAC gain = {r['ratio']:+.2f} (goal >= 0.5), "
            f"{r['ratio_vs_folded']:+.2f} against the folded dense model"
        )
    return {"source": source, "device": str(device), "threads": torch.get_num_threads(), "dense_macs": dense_macs,
            "dense_ms": ms["dense"], "dense_folded_ms": ms["dense_folded"], "manidp_slice_share": slices / steps,
            "manidp_static_removal": removal, "rows": rows}  # fmt: skip


@torch.no_grad()
def conv_scaling(args) -> None:
    print(f"batch-1 3x3 conv time, {torch.get_num_threads()} threads, best of 3 rounds; as a share of the full conv")
    print("width  size  kept   MACs (out only)  time (out only)   MACs (in and out)  time (in and out)  weight gather")
    for width, size in ((16, 32), (32, 16), (64, 8), (128, 16), (256, 8), (512, 4)):
        x = torch.randn(1, width, size, size)
        w = torch.randn(width, width, 3, 3)
        full = _conv_ms(x, w)
        for kept in (1.0, 0.75, 0.6, 0.5):
            k = max(1, round(kept * width))
            idx = torch.randperm(width)[:k].sort().values
            pairs = (idx[:, None] * width + idx).flatten()
            out_only = _conv_ms(x, torch.randn(k, width, 3, 3))
            both = _conv_ms(x[:, :k].contiguous(), torch.randn(k, k, 3, 3))
            gather = _timed_ms(lambda w=w, pairs=pairs: w.flatten(0, 1).index_select(0, pairs))
            print(f"{width:5d} {size:5d} {kept:5.2f} {k / width:16.2f} {out_only / full:16.2f} "
                  f"{(k / width) ** 2:18.2f} {both / full:18.2f} {gather / full:14.2f}")  # fmt: skip


def _conv_ms(x: torch.Tensor, w: torch.Tensor) -> float:
    return _timed_ms(lambda: torch.conv2d(x, w, None, 1, 1))


def _timed_ms(fn, n: int = 300) -> float:
    """Best of 3 rounds of `n` calls, ms per call."""
    for _ in range(30):
        fn()
    rounds = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        rounds.append((time.perf_counter() - t0) / n * 1e3)
    return min(rounds)


@torch.no_grad()
def haste_accuracy(args) -> None:
    if not args.model:
        raise SystemExit("haste-accuracy needs --model FILE (a trained model file)")
    device = torch.device(args.device)
    base, _, source, splits = inputs_for(args)
    base = base.to(device).eval()
    x, y = D.to_float(splits.test.x, splits, device=device), splits.test.y.to(device)
    example = x[:1]
    t0 = time.perf_counter()
    logits, dense_macs, _ = forward_with_macs(base, x, 500)
    results = {"model": args.model, "test_images": len(x), "threads": torch.get_num_threads(),
               "base": {"top1": float((logits.argmax(1) == y).float().mean()), "macs": float(dense_macs[0]),
                        "seconds": time.perf_counter() - t0}, "runs": []}  # fmt: skip
    print(f"{source}: base top-1 {results['base']['top1']:.4f}, {float(dense_macs[0]) / 1e6:.2f} MMACs")
    for target in args.targets:
        t0 = time.perf_counter()
        result = haste.Haste().run(Context(base, (), (), example, 10, Target("macs", target), device=device))
        logits, total, overhead = forward_with_macs(result.model, x, 500)
        run = {
            "target": target, "hyperplanes": result.extra["hyperplanes"],
            "search_reduction": result.extra["search"]["reduction"],
            "top1": float((logits.argmax(1) == y).float().mean()),
            "macs_mean": float(total.mean()), "macs_std": float(total.std()),
            "macs_reduction": 1 - float(total.mean()) / float(dense_macs[0]),
            "overhead_mean": float(overhead.mean()), "seconds": time.perf_counter() - t0,
        }  # fmt: skip
        results["runs"].append(run)
        print(
            f"target -{target:.1%}: L={run['hyperplanes']}, top-1 {run['top1']:.4f} "
            f"({100 * (run['top1'] - results['base']['top1']):+.2f} pt), MACs/input {run['macs_mean'] / 1e6:.2f} "
            f"+- {run['macs_std'] / 1e6:.2f} M (-{run['macs_reduction']:.1%} on test, -{run['search_reduction']:.1%}"
            f" on search noise), overhead {run['overhead_mean'] / run['macs_mean']:.1%}, {run['seconds']:.0f} s"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", nargs="?", default="latency", choices=["latency", "conv-scaling", "haste-accuracy"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None, help="a trained prune-cli model file")
    parser.add_argument("--arch", nargs="+", default=["resnet20", "resnet56"], help="random-init models (no --model)")
    parser.add_argument("--manidp", default=None, help="a trained ManiDP model file (from --model's base)")
    parser.add_argument("--images", type=int, default=64, help="inputs for MACs and timing (latency task)")
    parser.add_argument("--target", type=float, default=0.4, help="HASTE search target (MACs reduction)")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.1, 0.15, 0.2, 0.3, 0.467])
    parser.add_argument("--remain", type=float, default=0.6, help="ManiDP target remain rate t")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--per-round", type=int, default=16)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="latency, haste-accuracy: the device")
    parser.add_argument(
        "--static-below", type=float, default=0.01,
        help="ManiDP dynamic-to-static removal: channels fewer than this share of the inputs keep go",
    )  # fmt: skip
    parser.add_argument(
        "--smoke", action="store_true",
        help="a few seconds: resnet20 only, 8 inputs, 2 rounds of 2 (checks that the paths run; no figures)",
    )  # fmt: skip
    parser.add_argument("--out", default=None, help="write the figures as JSON")
    args = parser.parse_args()
    if args.manidp and not args.model:
        parser.error("--manidp needs --model, the base it was trained from")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    if not 0 < args.static_below <= 1:
        parser.error(f"--static-below must be in (0, 1], got {args.static_below}")
    if args.smoke:
        args.arch, args.images, args.rounds, args.per_round = ["resnet20"], 8, 2, 2
    torch.set_num_threads(args.threads)
    {"latency": latency, "conv-scaling": conv_scaling, "haste-accuracy": haste_accuracy}[args.task](args)


if __name__ == "__main__":
    main()
