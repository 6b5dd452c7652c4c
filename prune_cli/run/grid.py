"""Run an experiment's grid: every (criterion, target, seed) cell is one `pruning.run`, stored as one record.

Every cell prunes the same base model with the same selection, scope, fine-tuning budget and measurement code;
only the criterion differs, which is what makes the leaderboard fair. Finished cells (a trusted record with the
same key) are skipped, so a re-run recomputes nothing and an interrupted run resumes where it stopped.
`jobs > 1` runs cells in separate processes, with the CPU threads divided between them. Processes that run at
once on a CPU slow each other down, so those workers do not time latency: each leaves its record and pruned model
in `<out>/pending/`, and when the grid has finished this process times them one at a time, each taking turns with
the base, then files the records. A pending cell survives an interruption and is timed by the next run.
`executor: ray` runs the cells as Ray tasks instead (`ray_executor`), which leave the same pending files; a cell
whose task failed there is recorded in `<out>/failed/` (no leaderboard counts it) and run again by the next run.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import datetime as dt
import json
import multiprocessing
import os
import platform
import signal
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import models
from prune_cli import __version__, engine, metrics
from prune_cli.errors import BadModelFile, BadValue
from prune_cli.run import loading, pruning, training
from prune_cli.run.environment import machine
from prune_cli.run.experiment import Cell, Experiment, config_key, file_digest
from prune_cli.store.files import write_text
from prune_cli.store.modelfile import load_model, read_metadata
from prune_cli.store.records import CorruptRecord, Store

PENDING = "pending"  # <out>/pending/<key>.json and .safetensors: a cell run by a worker, its latency not yet timed
FAILED = "failed"  # <out>/failed/<key>.json: a cell whose Ray task raised (its error); removed once it has finished


@dataclass
class GridResult:
    records: list[dict[str, Any]]
    ran: int
    skipped: int
    corrupt: list[str]
    base_file: Path
    failed: list[dict[str, Any]] = field(default_factory=list)  # the failure records of cells that did not finish


def prepare_base(
    exp: Experiment, device: torch.device, reporter: Any = None, log: Callable = lambda m: None,
    trust: Collection[str] = (),
) -> Path:  # fmt: skip
    """The base model file: the experiment's `file`, or a model trained here once (reused on later runs). A user
    factory named in the experiment is built only when the user trusts it for this run, as one named in a model file.
    """
    if exp.base.file is not None:
        path = Path(exp.base.file)
        if not path.is_file():
            raise BadModelFile(f"base model file {path} does not exist")
        arch, _ = read_metadata(path)  # refuse a file that names an untrusted factory before any cell starts
        models.check_file_factory(arch["factory"], trust, str(path))
        return path
    b = exp.base
    models.check_file_factory(b.model, trust, source=f"experiment {exp.name!r}")
    cfg = engine.TrainConfig(epochs=b.epochs, lr=b.lr, batch_size=b.batch_size, seed=b.seed)
    recipe = {"model": b.model, "dataset": exp.dataset, "data_dir": exp.data_dir, "train": engine.config_dict(cfg)}
    path = exp.out_dir / f"base-{config_key(recipe)[:8]}.safetensors"
    if path.is_file():
        log(f"base model: {path} (trained earlier with the same recipe)")
        return path
    summary = training.train_and_save(
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
    trust: Collection[str] = (), cluster: Any = None, defer_timing: bool = False, time_pending_only: bool = False,
) -> GridResult:  # fmt: skip
    """Run every unfinished cell of `exp`; return the records of all its finished cells (in grid order). `trust`:
    user factories that the base model file (or the experiment) may name. `cluster`: the `ray_executor.RaySettings`
    of `executor: ray` (default: a local Ray instance on every core). `defer_timing`: leave every finished cell
    untimed in the pending folder (a grid on a busy machine), for a later run to time on an idle one.
    `time_pending_only`: run no cell, only time the pending ones."""
    if jobs < 1:
        raise BadValue(f"--jobs must be >= 1, got {jobs}")
    if defer_timing and time_pending_only:
        raise BadValue("--defer-timing leaves cells untimed and --time-pending only times them: give one")
    check_out_dir(exp.out_dir)
    if exp.executor == "ray":
        from prune_cli.run import ray_executor

        ray_executor.import_ray()  # a missing extra is one line now, not after the base model has been trained
        cluster = cluster or ray_executor.RaySettings()
        cluster.check_address()
        ray_executor.check_shared_dir(exp.shared_dir)
    device = device or engine.default_device()
    store = Store(exp.out_dir)
    cells = exp.cells()  # validates every job before any training
    trust = tuple(trust)
    base_file = prepare_base(exp, device, reporter, log, trust)
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
    untimed = {k for k in keys if k not in done and _pending(exp, k) is not None}
    waiting = {k: c for c, k in zip(cells, keys, strict=True) if k not in done and k not in untimed}
    todo = [(c, k) for k, c in waiting.items()]  # two labels, one config: run once
    left = 0  # cells this run leaves for a later one
    if time_pending_only:
        left, todo = len(todo), []
        log(f"{exp.name}: {len(untimed)} pending cells to time; {left} cells not run yet (--time-pending runs none)")
    else:
        log(f"{exp.name}: {len(cells)} cells, {len(cells) - len(todo)} already done, {len(todo)} to run -> "
            f"{exp.out_dir}")  # fmt: skip

    args = dict(exp=exp, base_file=str(base_file), digest=digest, device=str(device), trust=trust)
    failed: list[dict[str, Any]] = []
    if exp.executor == "ray" and todo:
        advance = reporter.counter("cells", len(todo)) if reporter is not None else (lambda n=1: None)

        def ran(key: str) -> None:
            untimed.add(key)
            advance(1)

        def fell(cell: Cell, key: str, error: str) -> None:
            failed.append(record_failure(exp, cell, key, digest, error))
            warn(f"cell {cell.spec.title} {cell.target_text} seed {cell.job.seed} failed: {error}")
            advance(1)

        ray_executor.run_on_ray(
            todo, args, cluster, pending=exp.out_dir / PENDING, finished=ran, failed=fell,
            log=log, warn=warn,
        )  # fmt: skip
    elif jobs == 1 or len(todo) <= 1:
        advance = reporter.counter("cells", len(todo)) if reporter is not None and todo else (lambda n=1: None)
        for cell, key in todo:
            log(f"cell {cell.spec.title} {cell.target_text} seed {cell.job.seed}")
            record = run_cell(cell, key, reporter=reporter, log=log, defer_latency=defer_timing, **args)
            if defer_timing:
                untimed.add(key)
            else:
                done[key] = record
            advance(1)
    else:
        advance = reporter.counter("cells", len(todo)) if reporter is not None else (lambda n=1: None)

        def finished(key: str) -> None:
            untimed.add(key)
            advance(1)

        run_in_processes(todo, jobs, args, exp.out_dir / PENDING, finished, log, warn)
    if untimed and defer_timing:
        log(f"{len(untimed)} finished cells wait untimed in {exp.out_dir / PENDING}: run compare again without "
            "--defer-timing on an idle machine to time them and file their records")  # fmt: skip
    elif untimed:
        ordered = [k for k in dict.fromkeys(keys) if k in untimed]  # grid order
        done.update(time_pending(exp, ordered, base_file, device, reporter, log, trust))
    for key in done:  # failed in an earlier run, finished now
        (exp.out_dir / FAILED / f"{key}.json").unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        (exp.out_dir / FAILED).rmdir()  # only when empty
    records = [done[k] for k in dict.fromkeys(keys) if k in done]
    return GridResult(records, len(todo), len(cells) - len(todo) - left, corrupt, base_file, failed)


def record_failure(exp: Experiment, cell: Cell, key: str, digest: str, error: str) -> dict[str, Any]:
    """Write `<out>/failed/<key>.json` (atomically): which cell failed and why. It is not a run record: the store,
    `report` and the leaderboard never read it, and the next `compare` runs the cell again."""
    failure = {
        "key": key, "config": cell.config(exp.dataset, exp.data_dir, digest), "experiment": exp.name,
        "criterion": cell.spec.title, "target": cell.job.target.reduction, "seed": cell.job.seed, "error": error,
        "failed": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip
    write_text(exp.out_dir / FAILED / f"{key}.json", json.dumps(failure, indent=1, default=str) + "\n")
    return failure


def check_out_dir(out: Path) -> None:
    """Refuse an output folder that is a file, or lies under one, before anything is trained or written."""
    for place in (out, *out.parents):
        if place.exists():
            if not place.is_dir():
                where = "is a file" if place == out else f"lies under {place}, which is a file"
                raise BadValue(f"--out {out} {where}: the output of compare is a folder")
            return


def run_in_processes(
    todo: list[tuple[Cell, str]], jobs: int, args: dict[str, Any], pending: Path, finished: Callable[[str], None],
    log: Callable[[str], None] = lambda m: None, warn: Callable[[str], None] = lambda m: None,
) -> None:  # fmt: skip
    """Run `todo` in `jobs` worker processes; `finished(key)` after each cell has left its files in `pending`.

    Ctrl-C (SIGINT, to this process or to the terminal's whole process group) is this process's alone to handle:
    the workers ignore it, and it kills them at once; SIGTERM to this process does the same. A cell a worker has
    finished is already in `pending` (written atomically) and survives; the cells in flight are lost and run again
    by the next `compare`. A worker whose driver is killed outright ends by itself (`_exit_with_parent`).
    """
    threads = max(1, (os.cpu_count() or 1) // jobs)
    log(f"running {len(todo)} cells in {jobs} processes with {threads} thread(s) each")
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked OpenMP or torch state
    pool = cf.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker, initargs=(threads, os.getpid()))
    futures: dict[cf.Future, str] = {}
    on_main = threading.current_thread() is threading.main_thread()  # only there can a signal handler be set
    previous_term = signal.signal(signal.SIGTERM, _terminate_as_interrupt) if on_main else None
    try:
        with _sigint_ignored():  # the workers start during submit and inherit SIG_IGN before their first line runs
            futures = {pool.submit(run_cell, cell, key, **args, defer_latency=True): key for cell, key in todo}
        for fut in cf.as_completed(futures):
            fut.result()
            finished(futures[fut])
    except KeyboardInterrupt:
        _stop(pool, pending)
        kept = sum(f.done() and not f.cancelled() and f.exception() is None for f in futures)
        warn(f"interrupted: worker processes stopped; {kept} cells finished in this run are kept, the cells "
             "in flight are lost; run compare again to resume")  # fmt: skip
        raise
    except BaseException:  # a cell failed: the others in flight finish and keep their results, nothing new starts
        try:
            pool.shutdown(wait=True, cancel_futures=True)
        except KeyboardInterrupt:
            _stop(pool, pending)
        raise
    finally:
        if on_main:
            signal.signal(signal.SIGTERM, previous_term)
    pool.shutdown(wait=True)


def _terminate_as_interrupt(signum, frame) -> None:
    """SIGTERM (`kill`, a job scheduler) ends the grid as Ctrl-C does: without it the workers outlived the driver."""
    raise KeyboardInterrupt


def _stop(pool: cf.ProcessPoolExecutor, pending: Path) -> None:
    """End the grid after a Ctrl-C: kill the workers, and ignore any further Ctrl-C from now on. The process is
    ending; a second Ctrl-C landing in its clean-up or in the interpreter's exit (which joins the pool's thread)
    would only print a traceback and leave the exit half done."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _kill_workers(pool, pending)


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _kill_workers(pool: cf.ProcessPoolExecutor, pending: Path) -> None:
    """Kill the pool's worker processes now (not after their cells), and remove the temporary files they were
    writing: no half-written file is left, and the interpreter's exit does not wait for a cell to finish."""
    # The executor offers no public way to reach its processes before Python 3.14 (`kill_workers`).
    processes = list((getattr(pool, "_processes", None) or {}).values())
    for p in processes:
        with contextlib.suppress(Exception):
            p.kill()
    pool.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        p.join(timeout=5)
    for tmp in pending.glob(".*.tmp"):  # io.atomic_write's temporary names
        tmp.unlink(missing_ok=True)


def _init_worker(threads: int, driver: int) -> None:
    """`driver`: the driver's pid, passed in: a worker still starting when the driver was killed would read its new
    parent from os.getppid() and wait for that one forever."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited already; kept for a start method that does not
    torch.set_num_threads(threads)
    threading.Thread(target=_exit_with_parent, args=(driver,), daemon=True).start()


def _exit_with_parent(parent: int, every_s: float = 1.0) -> None:
    """A worker whose driver died (SIGKILL, a crash) is adopted by another process: it then ends at once instead of
    running its cell to the end for nobody (its cell is run again by the next `compare`)."""
    while os.getppid() == parent:
        time.sleep(every_s)
    os._exit(1)


def run_cell(
    cell: Cell, key: str, *, exp: Experiment, base_file: str, digest: str, device: str, reporter: Any = None,
    log: Callable[[str], None] = lambda m: None, defer_latency: bool = False, trust: Collection[str] = (),
) -> dict[str, Any]:  # fmt: skip
    """Run one cell and store its record (atomically, when it has finished); with `defer_latency`, leave the record
    and the pruned model in the pending folder, untimed, for `time_pending`."""
    t0 = time.perf_counter()
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    outcome = pruning.run(
        base_file, cell.job, dataset=exp.dataset, data_dir=Path(exp.data_dir) if exp.data_dir else None,
        device=torch.device(device), reporter=reporter, log=log, time_latency=not defer_latency, trust=trust,
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
        "metric": "latency" if cell.job.target_latency else cell.job.target.metric,
        "seed": cell.job.seed,
        "bn_recalibration": s["bn_recalibration"],
        "base_file": str(base_file),
        "before": s["before"],
        "after": s["after"],
        "target_report": s["target_report"],
        "timings": {**s["timings"], "total_s": time.perf_counter() - t0},
        "widths": s["widths"],
        "history": outcome.history,
        "versions": versions(),
        "machine": machine(),
        "started": started,
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    latency_reached(record)
    if defer_latency:  # the model first: a pending record is only read when its model is there too
        pruning.save(outcome, exp.out_dir / PENDING / f"{key}.safetensors")
        write_text(exp.out_dir / PENDING / f"{key}.json", json.dumps(record, default=str))
    else:
        Store(exp.out_dir).save(record)
    return record


def latency_reached(record: dict[str, Any]) -> None:
    """For a latency-target cell, set `record["latency_target"]`: the requested fraction and batch, whether the
    criterion used it (False: it chose its own widths), the reduction its selection measured, and `reached`, the
    reduction measured on the final models, base and pruned in alternating turns at that batch (None until timed).
    Other cells are left alone."""
    job = record["config"]["job"]
    if not job.get("target_latency"):
        return
    batch = job.get("latency_batch", 1)
    base_ms, pruned_ms = record["before"].get(f"latency_b{batch}_ms"), record["after"].get(f"latency_b{batch}_ms")
    report = record["target_report"]
    used = report.get("metric") == "latency"
    record["latency_target"] = {
        "requested": job["target_latency"], "batch": batch, "runtime": job.get("runtime", "torch"), "used": used,
        "selection_reached": report.get("achieved") if used else None,
        "reached": 1 - pruned_ms / base_ms if base_ms and pruned_ms else None,
    }  # fmt: skip


def _pending(exp: Experiment, key: str) -> tuple[dict[str, Any], Path] | None:
    """The untimed record and model file a worker left for `key`, or None (then the cell runs again)."""
    folder = exp.out_dir / PENDING
    model_file = folder / f"{key}.safetensors"
    try:
        record = json.loads((folder / f"{key}.json").read_text())
    except (OSError, ValueError):
        return None
    return (record, model_file) if model_file.is_file() and record.get("key") == key else None


def time_pending(
    exp: Experiment, keys: list[str], base_file: Path, device: torch.device, reporter: Any = None,
    log: Callable[[str], None] = lambda m: None, trust: Collection[str] = (),
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Time the base and each pending cell's model in turn in this process, then store their records."""
    log(f"timing {len(keys)} pruned models, one at a time, each taking turns with the base")
    store, folder = Store(exp.out_dir), exp.out_dir / PENDING
    data_dir = Path(exp.data_dir) if exp.data_dir else None
    base, _, splits = loading.load_model_and_data(base_file, exp.dataset, data_dir, device=device, trust=trust)
    advance = reporter.counter("latency", len(keys)) if reporter is not None else (lambda n=1: None)
    timed = {}
    for key in keys:
        found = _pending(exp, key)
        if found is None:  # deleted by hand while this ran
            raise BadValue(f"the untimed run record of cell {key} disappeared from {folder}; run compare again")
        record, model_file = found
        job = record["config"]["job"]
        kw = dict(latency_batches=job["latency_batches"], device=device, latency_seconds=job["latency_seconds"],
                  runtime=job.get("runtime", "torch"))  # fmt: skip
        pruned = load_model(model_file, device, trust=trust).eval()
        before, after = metrics.time_side_by_side([base, pruned], splits, **kw)
        record["before"].update(before)
        record["after"].update(after)
        latency_reached(record)
        store.save(record)
        timed[key] = record
        model_file.unlink()
        (folder / f"{key}.json").unlink()
        advance(1)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
    return timed


def versions() -> dict[str, str]:
    import sklearn
    import torchvision

    return {"prune_cli": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "scikit_learn": sklearn.__version__, "python": platform.python_version()}  # fmt: skip
