"""`compare --executor ray`: the grid's cells as Ray tasks, on a local Ray instance or an existing cluster.

Each task runs the same one-run code as a local worker process (`grid.run_cell` with `defer_latency`), in a
scratch folder of its own, and returns the record and the pruned model file's bytes; this process writes them into
`<out>/pending/` as a local worker would, so resume, latency timing (`grid.time_pending`, here, one model at a
time), `report` and the leaderboard do not know which executor ran a cell. The base model file travels once through
Ray's object store and is written to a temporary file on each worker, so a node needs no shared disk; it needs
prune-cli installed and the experiment's dataset readable (digits is bundled; a `data_dir` must exist on every node).
With a shared folder (`--shared-dir`, mounted at the same path on every node), a task writes its model file and
record into a folder of this run under it and returns nothing: large models then stay out of the object store and
the driver's memory, and this process copies them into `<out>/pending/` from there.

A task that raises is recorded as failed (`<out>/failed/<key>.json`) and the grid goes on; a worker process that
dies is retried once by Ray, then recorded as failed. Ctrl-C cancels the tasks in flight; finished cells are kept.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from prune_cli.errors import BadValue, PruneCliError

EXTRA = "pip install 'prune-cli[ray]'"


class RayMissing(PruneCliError):
    """`--executor ray` without Ray installed."""


@dataclass(frozen=True)
class RaySettings:
    """Where and how the cells run. `address`: an existing cluster (None: start a local one with `num_cpus`, None
    meaning every core); each cell reserves `cpus_per_cell` CPUs (its torch threads) and `gpus_per_cell` GPUs."""

    address: str | None = None
    num_cpus: int | None = None
    cpus_per_cell: int = 1
    gpus_per_cell: float = 0.0

    def __post_init__(self):
        if self.cpus_per_cell < 1:
            raise BadValue(f"--cpus-per-cell must be >= 1, got {self.cpus_per_cell}")
        if not self.gpus_per_cell >= 0:  # also refuses NaN
            raise BadValue(f"--gpus-per-cell must be >= 0, got {self.gpus_per_cell}")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise BadValue(f"--jobs must be >= 1, got {self.num_cpus}")

    def check_address(self) -> None:
        """Refuse, in seconds and before the base model is trained, an address where no cluster listens: Ray itself
        retries such an address for minutes, printing warnings. A Ray Client address (ray://) or `auto` is left
        to Ray."""
        address = self.address
        if not address or "://" in address or address == "auto":
            return
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise BadValue(
                f"--address {address}: expected HOST:PORT, e.g. 10.0.0.1:6379 (`ray start --head` prints it)"
            )
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as exc:
            raise BadValue(
                f"--address {address}: no Ray cluster answers there ({exc.strerror or exc}); start one with "
                "`ray start --head`, or leave --address out to run on a local Ray instance"
            ) from None


def check_shared_dir(path: str | None) -> None:
    """Refuse, before any work, a `--shared-dir` that is not a folder this process can write in: the tasks leave
    their files there and this process reads them back."""
    if path is None:
        return
    folder = Path(path)
    if not folder.is_dir():
        state = "is not a folder" if folder.exists() else "does not exist"
        raise BadValue(f"--shared-dir {path} {state}: give a folder that every node of the cluster mounts at this path")
    try:
        with tempfile.NamedTemporaryFile(prefix=".prune-cli-probe-", dir=folder):
            pass
    except OSError as exc:
        raise BadValue(f"--shared-dir {path}: cannot write there ({exc.strerror or exc})") from None


def import_ray() -> Any:
    """Ray, or a one-line error naming the extra (checked before the base model is trained)."""
    try:
        import ray
    except ImportError:
        raise RayMissing(f"--executor ray needs Ray, which is not installed: {EXTRA}") from None
    return ray


def run_on_ray(
    todo: list[tuple[Any, str]], args: dict[str, Any], settings: RaySettings, *, pending: Path,
    finished: Callable[[str], None], failed: Callable[[Any, str, str], None],
    log: Callable[[str], None] = lambda m: None, warn: Callable[[str], None] = lambda m: None,
) -> None:  # fmt: skip
    """Run the cells of `todo` ((cell, key) pairs) as Ray tasks. Each result is written into `pending` as it
    arrives, then `finished(key)`; a cell whose task raised or whose worker died twice goes to `failed(cell, key,
    error)`. `args`: run_cell's keyword arguments (exp, base_file, digest, device, trust); with `exp.shared_dir`
    the tasks leave their files in a folder of this run under it (removed at the end), not in their return value."""
    ray = import_ray()
    started_here = _connect(ray, settings, log)
    refs: dict[Any, tuple[Any, str]] = {}
    shared: Path | None = None
    try:
        _check_fits(ray, settings)
        if (shared_dir := args["exp"].shared_dir) is not None:  # absolute: a worker's working folder is not ours
            try:
                shared = Path(tempfile.mkdtemp(prefix="prune-cli-run-", dir=Path(shared_dir).absolute()))
            except OSError as exc:  # checked before the base was trained, but that may have taken hours
                raise BadValue(f"--shared-dir {shared_dir}: cannot write there ({exc.strerror or exc})") from None
            log(f"the tasks leave their files in {shared}")
        base_ref = ray.put(Path(args["base_file"]).read_bytes())  # once: every task reads this one copy
        device = "cuda" if settings.gpus_per_cell > 0 else "cpu"  # a worker's own GPU, whatever the driver has
        task = ray.remote(_run_cell_task).options(
            num_cpus=settings.cpus_per_cell, num_gpus=settings.gpus_per_cell, max_retries=1, retry_exceptions=False
        )
        cell_args = {**args, "device": device, "shared": str(shared) if shared else None}
        log(f"running {len(todo)} cells as Ray tasks ({settings.cpus_per_cell} CPU, {settings.gpus_per_cell:g} GPU, "
            f"{settings.cpus_per_cell} thread(s) each)")  # fmt: skip
        for cell, key in todo:
            refs[task.remote(cell, key, base_ref, cell_args, settings.cpus_per_cell)] = (cell, key)
        waiting = list(refs)
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1)
            cell, key = refs[ready[0]]
            try:
                result = ray.get(ready[0])
            except Exception as exc:  # the task raised, or its worker died on both tries
                failed(cell, key, _describe(exc))
                continue
            try:
                _deliver(result, key, pending, shared, args["base_file"])
            except FileNotFoundError as exc:
                if shared is None:
                    raise
                # The task wrote into a folder of its own node that has the same path, not into a shared one.
                failed(cell, key, f"--shared-dir: the task's files are not in {shared} on this machine "
                       f"({exc.filename}); is the folder shared by every node, at the same path?")  # fmt: skip
                continue
            finished(key)
    except KeyboardInterrupt:
        # The process is ending: a second Ctrl-C in the clean-up would only leave it half done (as compare._stop).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _cancel(ray, list(refs))
        warn("interrupted: Ray tasks cancelled; the cells finished in this run are kept, the cells in flight are "
             "lost; run compare again to resume")  # fmt: skip
        raise
    finally:
        if shared is not None:
            shutil.rmtree(shared, ignore_errors=True)
        if started_here:
            with contextlib.suppress(Exception):
                ray.shutdown()


def _deliver(result: tuple[dict, bytes] | None, key: str, pending: Path, shared: Path | None, base_file: str) -> None:
    """Write a finished task's model file and record into `pending`: from its return value, or (None) from the
    shared folder it wrote them into. `base_file`: the driver's base model file, as a local worker records it."""
    from prune_cli.run.grid import PENDING
    from prune_cli.store.files import atomic_write, write_text

    if result is None:
        assert shared is not None, "a task returns nothing only when it has a shared folder"
        record = json.loads((shared / PENDING / f"{key}.json").read_text())
        source = shared / PENDING / f"{key}.safetensors"
    else:
        record, model_bytes = result
    # The model first: a pending record is only read when its model is there too (grid._pending).
    with atomic_write(pending / f"{key}.safetensors") as tmp:
        if result is None:
            shutil.copyfile(source, tmp)  # a copy: the shared folder may be another file system
        else:
            tmp.write_bytes(model_bytes)
    record["base_file"] = base_file  # not the worker's temporary copy (and not part of the key)
    write_text(pending / f"{key}.json", json.dumps(record, default=str))
    if result is None:
        for name in (f"{key}.safetensors", f"{key}.json"):
            (shared / PENDING / name).unlink(missing_ok=True)


def _cancel(ray: Any, refs: list[Any], within: float = 30.0) -> None:
    """Cancel the tasks of `refs` (killing their workers), and again until each one has ended or `within` seconds
    have passed: Ray loses a cancel that arrives while a task is being handed to a worker (seen under load: the
    task then ran to its end, minutes of a cluster's time)."""
    deadline = time.monotonic() + within
    while refs and (left := deadline - time.monotonic()) > 0:
        for ref in refs:
            with contextlib.suppress(Exception):  # one that has finished meanwhile: nothing to cancel
                ray.cancel(ref, force=True)
        try:
            _, refs = ray.wait(refs, num_returns=len(refs), timeout=min(1.0, left))
        except Exception:  # the connection is gone: nothing more can be cancelled from here
            return


def _connect(ray: Any, settings: RaySettings, log: Callable[[str], None]) -> bool:
    """Join the cluster at `settings.address`, or start a local one; True when this call started the connection
    (and so ends it). A connection that is already open in this process (a notebook, a test) is used as it is."""
    if ray.is_initialized():
        return False
    # This tool contacts no server of its own accord (the README's promise): no usage statistics unless asked for.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    quiet = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR, configure_logging=True)
    try:
        if settings.address:
            ray.init(address=settings.address, **{k: v for k, v in quiet.items() if k != "include_dashboard"})
            log(f"joined the Ray cluster at {settings.address}: {_cpus(ray)} CPUs")
        else:
            ray.init(num_cpus=settings.num_cpus or os.cpu_count() or 1, **quiet)
            log(f"started a local Ray instance with {_cpus(ray)} CPUs")
    except ConnectionError as exc:
        raise BadValue(f"--address {settings.address}: cannot reach a Ray cluster there ({exc})") from None
    return True


def _check_fits(ray: Any, settings: RaySettings) -> None:
    """Refuse cells that no node can hold: Ray would keep them waiting for such a node for ever, silently."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if any(r.get("CPU", 0) >= settings.cpus_per_cell and r.get("GPU", 0) >= settings.gpus_per_cell for r in nodes):
        return
    largest = max(nodes, key=lambda r: (r.get("GPU", 0), r.get("CPU", 0)), default={})
    raise BadValue(
        f"a cell asks for {settings.cpus_per_cell} CPUs and {settings.gpus_per_cell:g} GPUs (--cpus-per-cell, "
        f"--gpus-per-cell), but no node of the Ray cluster has them (the largest: {largest.get('CPU', 0):g} CPUs, "
        f"{largest.get('GPU', 0):g} GPUs)"
    )


def _cpus(ray: Any) -> int:
    return int(ray.cluster_resources().get("CPU", 0))


def _describe(exc: BaseException) -> str:
    """One line for the failed record: the error the cell itself raised, not Ray's wrapper around it."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}".rstrip(": ")


# ----------------------------------------------------------------------------------------------- on a worker
_BASE_FILES: dict[str, str] = {}  # digest -> the base model's file in this worker process (written once)


def _base_file(digest: str, data: bytes) -> str:
    """The base model as a file on this worker. Kept for the process's life: a worker runs many cells, and the
    base's test top-1 is cached per file path (pruning._base_top1)."""
    if digest not in _BASE_FILES:
        folder = tempfile.mkdtemp(prefix="prune-cli-base-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        path = os.path.join(folder, "base.safetensors")
        with open(path, "wb") as f:
            f.write(data)
        _BASE_FILES[digest] = path
    return _BASE_FILES[digest]


def _run_cell_task(cell: Any, key: str, base: bytes, args: dict[str, Any], threads: int) -> tuple[dict, bytes] | None:
    """One cell on a Ray worker: run_cell in a scratch output folder, then hand back its record and model bytes; with
    a shared folder (`args["shared"]`), run_cell writes them into its `pending/` and the task returns None."""
    import torch

    from prune_cli.run.grid import PENDING, run_cell

    shared = args.get("shared")
    if shared is not None and not os.path.isdir(shared):
        raise BadValue(f"--shared-dir: {shared} does not exist on node {socket.gethostname()}; mount the shared "
                       "folder at the same path on every node")  # fmt: skip
    torch.set_num_threads(threads)  # as many threads as CPUs reserved: cells on one node do not oversubscribe it
    base_file = _base_file(args["digest"], base)
    with tempfile.TemporaryDirectory(prefix="prune-cli-cell-") as scratch:
        exp = replace(args["exp"], out=shared or scratch)
        try:
            record = run_cell(
                cell, key, exp=exp, base_file=base_file, digest=args["digest"], device=args["device"],
                defer_latency=True, trust=args.get("trust", ()),
            )  # fmt: skip
        except PruneCliError:
            raise
        except Exception as exc:  # an unexpected error: keep where it happened for the failed record
            raise RuntimeError(f"{exc!r} at {_where(exc)}") from exc
        if shared is not None:
            return None
        model_bytes = (Path(scratch) / PENDING / f"{key}.safetensors").read_bytes()
    return record, model_bytes


def _where(exc: BaseException) -> str:
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    return f"{Path(frame.filename).name}:{frame.lineno}"
