"""Run an experiment's grid: every (criterion, target, seed) cell is one `pruning.run`, stored as one record.

Every cell prunes the same base model with the same selection, scope, fine-tuning budget and measurement code;
only the criterion differs, which is what makes the leaderboard fair. Finished cells (a trusted record with the
same key) are skipped, so a re-run recomputes nothing and an interrupted run resumes where it stopped.
`jobs > 1` runs cells in separate processes, with the CPU threads divided between them.
"""

from __future__ import annotations

import concurrent.futures as cf
import datetime as dt
import multiprocessing
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prune_cli import __version__, engine, pipeline, pruning
from prune_cli.errors import BadModelFile, BadValue
from prune_cli.experiment import Cell, Experiment, config_key, file_digest
from prune_cli.store import CorruptRecord, Store


@dataclass
class GridResult:
    records: list[dict[str, Any]]
    ran: int
    skipped: int
    corrupt: list[str]
    base_file: Path


def prepare_base(exp: Experiment, device: torch.device, reporter: Any = None, log: Callable = lambda m: None) -> Path:
    """The base model file: the experiment's `file`, or a model trained here once (reused on later runs)."""
    if exp.base.file is not None:
        path = Path(exp.base.file)
        if not path.is_file():
            raise BadModelFile(f"base model file {path} does not exist")
        return path
    b = exp.base
    cfg = engine.TrainConfig(epochs=b.epochs, lr=b.lr, batch_size=b.batch_size, seed=b.seed)
    recipe = {"model": b.model, "dataset": exp.dataset, "data_dir": exp.data_dir, "train": engine.config_dict(cfg)}
    path = exp.out_dir / f"base-{config_key(recipe)[:8]}.safetensors"
    if path.is_file():
        log(f"base model: {path} (trained earlier with the same recipe)")
        return path
    summary = pipeline.train_and_save(
        b.model,
        exp.dataset,
        exp.data_dir,
        cfg,
        path,
        device=device,
        reporter=reporter,
        log=log,  # type: ignore[arg-type]
    )
    log(f"base model: {b.model} trained {b.epochs} epochs, test top-1 {summary['test_top1']:.4f} -> {path}")
    return path


def run_grid(
    exp: Experiment, *, jobs: int = 1, device: torch.device | None = None, reporter: Any = None,
    log: Callable[[str], None] = lambda m: None, warn: Callable[[str], None] = lambda m: None,
) -> GridResult:  # fmt: skip
    """Run every unfinished cell of `exp`; return all its records (in grid order)."""
    if jobs < 1:
        raise BadValue(f"--jobs must be >= 1, got {jobs}")
    device = device or engine.default_device()
    store = Store(exp.out_dir)
    cells = exp.cells()  # validates every job before any training
    base_file = prepare_base(exp, device, reporter, log)
    digest = file_digest(base_file)
    keys = [config_key(c.config(exp.dataset, exp.data_dir, digest)) for c in cells]

    done: dict[str, dict] = {}
    corrupt: list[str] = []
    for key in dict.fromkeys(keys):
        try:
            if (record := store.load(key)) is not None:
                done[key] = record
        except CorruptRecord as exc:
            corrupt.append(str(exc))
            warn(f"corrupt run record {exc}; running that cell again")
    pending = {k: c for c, k in zip(cells, keys, strict=True) if k not in done}  # two labels, one config: once
    todo = [(c, k) for k, c in pending.items()]
    log(f"{exp.name}: {len(cells)} cells, {len(cells) - len(todo)} already done, {len(todo)} to run -> {exp.out_dir}")

    args = dict(exp=exp, base_file=str(base_file), digest=digest, device=str(device))
    if jobs == 1 or len(todo) <= 1:
        advance = reporter.counter("cells", len(todo)) if reporter is not None and todo else (lambda n=1: None)
        for cell, key in todo:
            log(f"cell {cell.spec.title} target {cell.job.target.reduction:g} seed {cell.job.seed}")
            done[key] = run_cell(cell, key, reporter=reporter, log=log, **args)
            advance(1)
    else:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        log(f"running {len(todo)} cells in {jobs} processes with {threads} thread(s) each")
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked OpenMP or torch state
        with cf.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker, initargs=(threads,)) as pool:
            futures = {pool.submit(run_cell, cell, key, **args): key for cell, key in todo}
            advance = reporter.counter("cells", len(todo)) if reporter is not None else (lambda n=1: None)
            try:
                for fut in cf.as_completed(futures):
                    done[futures[fut]] = fut.result()
                    advance(1)
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    return GridResult([done[k] for k in dict.fromkeys(keys)], len(todo), len(cells) - len(todo), corrupt, base_file)


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def run_cell(
    cell: Cell, key: str, *, exp: Experiment, base_file: str, digest: str, device: str, reporter: Any = None,
    log: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:  # fmt: skip
    """Run one cell and store its record (atomically, when it has finished)."""
    t0 = time.perf_counter()
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    outcome = pruning.run(
        base_file, cell.job, dataset=exp.dataset, data_dir=Path(exp.data_dir) if exp.data_dir else None,
        device=torch.device(device), reporter=reporter, log=log,
    )  # fmt: skip
    s = outcome.summary()
    record = {
        "key": key,
        "config": cell.config(exp.dataset, exp.data_dir, digest),
        "experiment": exp.name,
        "criterion": cell.spec.title,
        "criterion_name": cell.job.criterion,
        "options": s["options"],
        "result": s["result"],
        "target": cell.job.target.reduction,
        "metric": cell.job.target.metric,
        "seed": cell.job.seed,
        "base_file": str(base_file),
        "before": s["before"],
        "after": s["after"],
        "target_report": s["target_report"],
        "timings": {**s["timings"], "total_s": time.perf_counter() - t0},
        "widths": s["widths"],
        "history": outcome.history,
        "versions": versions(),
        "machine": pipeline.machine(),
        "started": started,
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    Store(exp.out_dir).save(record)
    return record


def versions() -> dict[str, str]:
    import sklearn
    import torchvision

    return {"prune_cli": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "scikit_learn": sklearn.__version__, "python": platform.python_version()}  # fmt: skip
