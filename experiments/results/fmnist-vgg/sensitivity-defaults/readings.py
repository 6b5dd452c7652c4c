"""Sensitivity (SBPF) defaults, measured: every (form, layers, target) cell is `prune-cli prune MODEL --criterion
sensitivity --opt form=F [--opt cost_aware=true] --opt layers=L --target-macs T --finetune-epochs 0 --calib-images
1024 --seed 0` (the same `prune_cli.run.pruning.run`, latency not timed), and l1 the same way with `--criterion l1`.

The damage sweep does not depend on the form, cost_aware, the layers kept or the target (each (group, level, trial)
damage has its own seed), so it is computed once per model and shared by that model's cells; `--cache DIR` keeps it
as JSON (numbers only) so that an interrupted reading resumes. Groups outside a cell's `layers` are simply not read.

Usage (from the repository root):
  python experiments/results/fmnist-vgg/sensitivity-defaults/readings.py MODEL_FILE [MODEL_FILE ...] \
      [--targets 0.3,0.5] [--cells inverse:conv,inverse+cost:conv] [--cache DIR] [--threads 1]
Prints one Markdown row per cell (top-1 on the test split after BatchNorm re-estimation, no fine-tuning).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

import criteria.sensitivity as S
from prune_cli import engine, surgery
from prune_cli.api import Target
from prune_cli.run import loading, pruning

_SWEEP = S.sweep


class PartDone(Exception):
    """Raised after a `--sweep-part` process has written its share of the sweep."""


def shared_sweep(cache_dir: Path | None, tag: str, part: tuple[int, int] | None = None):
    """A drop-in for `criteria.sensitivity.sweep` that sweeps every group in scope once and reuses it.

    part (i, n): sweep only groups i, i+n, ... of the scope, write them to the cache and raise PartDone; a later
    run merges the n parts (rows in scope order, as one sweep writes them: each (group, level, trial) is seeded
    on its own, so the merged sweep is the same).
    """
    memo: dict[str, tuple] = {}

    def sweep(ctx, o, groups=None):
        fields = {k: v for k, v in asdict(o).items() if k not in ("form", "cost_aware", "layers", "rank", "max_ratio")}
        key = hashlib.sha256(json.dumps([tag, fields, [g.id for g in ctx.groups]], default=str).encode()).hexdigest()
        path = cache_dir / f"sweep-{key[:16]}.json" if cache_dir else None
        if part is not None:
            i, n = part
            t0 = time.perf_counter()
            base, rows, reused = _SWEEP(ctx, o, list(ctx.groups)[i::n])
            print(f"<!-- {tag}: sweep part {i}/{n} took {time.perf_counter() - t0:.0f} s -->", flush=True)
            (cache_dir / f"sweep-{key[:16]}-part{i}of{n}.json").write_text(json.dumps([base, rows, reused]))
            raise PartDone
        if key not in memo:
            parts = sorted(cache_dir.glob(f"sweep-{key[:16]}-part*.json")) if cache_dir else []
            if path is not None and not path.exists() and parts:
                loaded = [json.loads(q.read_text()) for q in parts]
                order = {g.id: k for k, g in enumerate(ctx.groups)}
                rows = sorted((r for _, rs, _ in loaded for r in rs), key=lambda r: order[r["group"]])
                if {r["group"] for r in rows} == set(order) and all(b == loaded[0][0] for b, _, _ in loaded):
                    path.write_text(json.dumps([loaded[0][0], rows, loaded[0][2]]))
            if path is not None and path.exists():
                base, rows, reused = json.loads(path.read_text())
            else:
                t0 = time.perf_counter()
                base, rows, reused = _SWEEP(ctx, o, list(ctx.groups))
                print(f"<!-- {tag}: sweep of {len(ctx.groups)} groups took {time.perf_counter() - t0:.0f} s -->")
                if path is not None:
                    path.write_text(json.dumps([base, rows, reused]))
            memo[key] = (base, rows, reused)
        base, rows, reused = memo[key]
        wanted = {g.id for g in (ctx.groups if groups is None else groups)}
        return base, [r for r in rows if r["group"] in wanted], reused

    return sweep


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", type=Path)
    p.add_argument("--targets", default="0.3,0.5")
    p.add_argument(
        "--cells",
        default="inverse:conv,inverse+cost:conv,linear:conv,linear+cost:conv",
        help="form[+cost]:layers, comma separated (+cost: cost_aware=true)",
    )
    p.add_argument("--cache", type=Path, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-l1", action="store_true", help="skip the l1 rows")
    p.add_argument("--sweep-part", default=None, help="i/n: only sweep groups i, i+n, ... into --cache, then exit")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.cache:
        args.cache.mkdir(parents=True, exist_ok=True)
    targets = [float(t) for t in args.targets.split(",")]
    cells = [tuple(c.split(":")) for c in args.cells.split(",")]
    print("| model | target | criterion | form | cost_aware | layers | MACs removed | top-1 (%) | ratios per group |")
    print("|---|---|---|---|---|---|---|---|---|")
    part = tuple(int(v) for v in args.sweep_part.split("/")) if args.sweep_part else None
    if part is not None and args.cache is None:
        p.error("--sweep-part needs --cache")
    for model_file in args.models:
        S.sweep = shared_sweep(args.cache, str(model_file.resolve()), part)
        if part is not None:  # the context `pruning.run` builds, without measuring the base first
            job = pruning.PruneJob(criterion="sensitivity", calib_images=1024, seed=0)
            device = engine.default_device()
            base, _, splits = loading.load_model_and_data(model_file, None, None, seed=job.seed, device=device)
            criterion = pruning.build_criterion(job.criterion, job.options)
            groups = surgery.channel_groups(base, loading.example_input(splits).to(device))
            try:
                criterion.run(pruning.make_context(base, groups, splits, criterion, job, device))
            except PartDone:
                continue
        runs = [("l1", {}, t) for t in targets] if not args.no_l1 else []
        for t in targets:
            for form, layers in cells:
                options = {"form": form.removesuffix("+cost"), "cost_aware": form.endswith("+cost"), "layers": layers}
                runs.append(("sensitivity", options, t))
        for name, options, t in runs:
            job = pruning.PruneJob(criterion=name, options=options, target=Target("macs", t), finetune_epochs=0,
                                   calib_images=1024, seed=0)  # fmt: skip
            out = pruning.run(model_file, job, time_latency=False)
            rep = out.target_report
            ratios = " ".join(f"{r:.2f}" for r in rep.get("ratios", {}).values())
            cells_text = " | ".join(str(options.get(k, "")) for k in ("form", "cost_aware", "layers"))
            print(f"| {model_file.parent.name} | -{t:.0%} | {name} | {cells_text} | {rep['achieved']:.1%} | "
                  f"{100 * out.after['top1']:.2f} | {ratios} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
