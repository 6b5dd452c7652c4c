"""`compare --executor ray` on one local Ray instance of 2 CPUs (started once for the module): the same records as the
local executor (and through a shared folder), a killed driver resumed, Ctrl-C cancelling the tasks, a failing cell and
a dying worker recorded while the grid goes on, a missing extra refused."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers import train_digits_base
from typer.testing import CliRunner

from prune_cli.cli import app
from prune_cli.run.experiment import config_key, load_experiment

ray = pytest.importorskip("ray")

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
ACCURACY = ["target", "criterion", "seeds", "macs_removed", "params_removed", "top1_before_ft_mean", "top1_mean"]
# What may differ between two runs of one cell: when and where it ran, and how fast.
UNTIMED = ("latency", "load_average", "timings", "seconds", "started", "finished", "machine", "base_file")


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def experiment(path: Path, **values) -> Path:
    """A digits grid without fine-tuning (with one epoch the records of both executors were equal too, but a cell
    took a minute on a busy 2-core machine)."""
    spec = {
        "name": "tiny", "dataset": "digits", "criteria": ["l1"], "targets": [0.3, 0.5], "seeds": [0, 1],
        "finetune": {"epochs": 0}, "latency_batches": [1], "latency_seconds": 0.05, "calib_images": 128, **values,
    }  # fmt: skip
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def cluster():
    """One local Ray instance for the module: `compare` in this process joins it; a child process gets its address."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return train_digits_base(tmp_path_factory.mktemp("base"), epochs=1)


@pytest.fixture(scope="module")
def ray_grid(cluster, base, tmp_path_factory):
    """l1 x two targets x two seeds, as Ray tasks (one CPU and one thread each)."""
    folder = tmp_path_factory.mktemp("ray")
    exp = experiment(folder / "tiny.yaml", base={"file": str(base)}, out=str(folder / "out"))
    result = run("compare", exp, "--executor", "ray")
    assert result.exit_code == 0, result.output
    return exp, folder / "out", result


def records(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (out / "records").glob("*.json")}


def without_timings(value, tolerance=1e-6):
    """`value` with every field that timing or placement decides removed, floats rounded to `tolerance`."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if not any(u in k for u in UNTIMED)}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    if isinstance(value, float):
        return round(value / tolerance) * tolerance
    return value


def test_ray_gives_the_records_of_the_local_executor(ray_grid, tmp_path):
    exp, out, result = ray_grid
    assert "4 cells run, 0 reused" in result.output and not (out / "pending").exists()
    local = tmp_path / "local"
    result = run("compare", exp, "--jobs", "2", "--out", local)  # two processes of one thread, as the tasks
    assert result.exit_code == 0, result.output
    by_ray, by_local = records(out), records(local)
    assert len(by_ray) == 4 and by_ray.keys() == by_local.keys()
    for key, r in by_ray.items():
        assert r["config"] == by_local[key]["config"] and r["base_file"] == by_local[key]["base_file"]
        assert r["after"]["latency_b1_ms"] > 0 and r["before"]["latency_b1_ms"] > 0  # timed here, after the grid
        assert without_timings(r) == without_timings(by_local[key]), key
    pd.testing.assert_frame_equal(
        pd.read_csv(out / "leaderboard.csv")[ACCURACY], pd.read_csv(local / "leaderboard.csv")[ACCURACY]
    )


def test_a_killed_driver_resumes_without_recomputing_finished_cells(cluster, ray_grid, tmp_path):
    """SIGKILL a `compare --executor ray` child once a cell has come back; the re-run keeps that cell (a marker
    written into it survives) and ends with the leaderboard of the uninterrupted run."""
    exp, full, _ = ray_grid
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "prune_cli", "compare", str(exp), "--out", str(out), "--executor", "ray",
           "--address", cluster, "-q"]  # fmt: skip
    child = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not list((out / "pending").glob("*.json")) and child.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    os.kill(child.pid, signal.SIGKILL)
    _, stderr = child.communicate()
    came_back = sorted((out / "pending").glob("*.json"))
    assert came_back, stderr.decode()[-2000:]
    assert not (out / "records").exists()  # killed before the grid's end: nothing was timed yet
    for path in came_back:
        record = json.loads(path.read_text())
        record["timings"]["marker"] = 1.0  # survives only if the cell is not run again
        path.write_text(json.dumps(record))

    result = run("compare", exp, "--out", out, "--executor", "ray")
    assert result.exit_code == 0, result.output
    assert f"{4 - len(came_back)} cells run, {len(came_back)} reused" in result.output
    resumed = records(out)
    assert all(resumed[p.stem]["timings"]["marker"] == 1.0 for p in came_back)
    assert sum("marker" in r["timings"] for r in resumed.values()) == len(came_back)
    pd.testing.assert_frame_equal(
        pd.read_csv(out / "leaderboard.csv")[ACCURACY], pd.read_csv(full / "leaderboard.csv")[ACCURACY]
    )


def test_a_failing_cell_is_recorded_and_the_others_finish(ray_grid, base, tmp_path, monkeypatch):
    """Target 0.95 is beyond what --max-ratio allows: that cell raises inside its task; the other one, in the same
    grid, starts only once the failure is recorded and finishes with the record of the full grid, the leaderboard
    holds it alone, and a re-run tries the failed cell again."""
    from prune_cli.run import ray_executor

    _, full, _ = ray_grid
    out = tmp_path / "out"

    def after_the_failure(cell, key, base_bytes, args, threads):  # shipped by value (see below)
        from prune_cli.run import ray_executor  # on the worker: the module as it is, not patched

        deadline = time.time() + 300
        while cell.job.target.reduction != 0.95 and not list(out.glob("failed/*.json")) and time.time() < deadline:
            time.sleep(0.1)
        return ray_executor._run_cell_task(cell, key, base_bytes, args, threads)

    monkeypatch.setattr(ray_executor, "_run_cell_task", after_the_failure)
    exp = experiment(tmp_path / "bad.yaml", base={"file": str(base)},
                     targets=[0.95, 0.3], seeds=[0], out=str(out))  # fmt: skip
    result = run("compare", exp, "--executor", "ray")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "1 of 2 cells run failed" in result.output and "TargetUnreachable" in result.output
    (good,) = records(out)
    assert without_timings(records(out)[good]) == without_timings(records(full)[good])
    (failure,) = [json.loads(p.read_text()) for p in (out / "failed").glob("*.json")]
    assert failure["target"] == 0.95 and "TargetUnreachable" in failure["error"]
    assert failure["key"] == config_key(failure["config"]) and failure["key"] not in records(out)
    assert list(records(out)) == [good]  # the failure is not a run record
    lb = pd.read_csv(out / "leaderboard.csv")
    assert list(lb["target"]) == [0.3]
    again = run("compare", exp, "--executor", "ray")
    assert again.exit_code == 2 and "1 cells run, 1 reused" in again.output  # retried, and failed again
    rebuilt = run("report", out)
    assert rebuilt.exit_code == 0 and "1 cells failed and are not in the leaderboard" in rebuilt.output
    assert list(pd.read_csv(out / "leaderboard.csv")["target"]) == [0.3]


def test_a_cell_that_finishes_removes_its_earlier_failure(ray_grid, tmp_path):
    """A failure recorded by an earlier run is dropped once its cell has a record (here: reused from the grid)."""
    exp, full, _ = ray_grid
    out = tmp_path / "out"
    shutil.copytree(full / "records", out / "records")
    key = next(iter(records(out)))
    (out / "failed").mkdir()
    (out / "failed" / f"{key}.json").write_text(json.dumps({"key": key, "error": "RuntimeError: worker died"}))
    result = run("compare", exp, "--out", out, "--executor", "ray")
    assert result.exit_code == 0, result.output
    assert "0 cells run, 4 reused" in result.output and not (out / "failed").exists()


def test_without_ray_the_executor_is_one_line_naming_the_extra(base, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    exp = experiment(tmp_path / "e.yaml", base={"file": str(base)}, out=str(tmp_path / "out"), executor="ray")
    result = run("compare", exp)
    assert result.exit_code == 2, result.output
    assert "prune-cli[ray]" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_the_executor_key_changes_no_cell_key(tmp_path):
    spec = experiment(tmp_path / "e.yaml", base={"file": "x.safetensors"})
    local, on_ray = (load_experiment(spec, {"executor": e}) for e in ("local", "ray"))
    assert on_ray.executor == "ray"
    assert [config_key(c.config("digits", None, "d")) for c in local.cells()] == [
        config_key(c.config("digits", None, "d")) for c in on_ray.cells()
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--executor", "dask"], "`executor` must be one of local, ray"),
        (["--address", "10.0.0.1:6379"], "are for --executor ray"),
        (["--executor", "ray", "--cpus-per-cell", "0"], "--cpus-per-cell must be >= 1"),
        (["--executor", "ray", "--address", "127.0.0.1:1"], "no Ray cluster answers there"),
        (["--executor", "ray", "--address", "head-node"], "expected HOST:PORT"),
        (["--shared-dir", "/tmp"], "are for --executor ray"),
        (["--executor", "ray", "--shared-dir", "no/such/folder"], "--shared-dir no/such/folder does not exist"),
        (["--executor", "ray", "--shared-dir", "/proc"], "--shared-dir /proc: cannot write there"),
    ],
)
def test_bad_executor_options_are_one_line(base, tmp_path, args, message):
    exp = experiment(tmp_path / "e.yaml", base={"file": str(base)}, out=str(tmp_path / "out"))
    result = run("compare", exp, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_a_cell_no_node_can_hold_is_refused_not_left_waiting(cluster, base, tmp_path):
    """Ray would keep a task that asks for more than any node has waiting for ever, without a word."""
    exp = experiment(tmp_path / "e.yaml", base={"file": str(base)}, out=str(tmp_path / "out"))
    result = run("compare", exp, "--executor", "ray", "--cpus-per-cell", "3")
    assert result.exit_code == 2, result.output
    assert "no node of the Ray cluster has them (the largest: 2 CPUs, 0 GPUs)" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_a_worker_that_dies_is_retried_once_then_recorded_as_failed(cluster, ray_grid, base, tmp_path, monkeypatch):
    """The worker process of the 0.4 cell exits (as if killed, out of memory) on each try: Ray runs that cell twice,
    then it is recorded as failed and compare ends in one line; the 0.3 cell of the same grid finishes."""
    from prune_cli.run import ray_executor

    _, full, _ = ray_grid
    tries = tmp_path / "tries"
    tries.mkdir()

    out = tmp_path / "out"

    def dying(cell, key, base_bytes, args, threads):  # shipped by value: this test module is not importable there
        if cell.job.target.reduction != 0.4:  # runs once the failure is recorded: the grid goes on after it
            from prune_cli.run import ray_executor  # on the worker: the module as it is, not patched

            deadline = time.time() + 300
            while not list(out.glob("failed/*.json")) and time.time() < deadline:
                time.sleep(0.1)
            return ray_executor._run_cell_task(cell, key, base_bytes, args, threads)
        (tries / f"{os.getpid()}").touch()
        os._exit(1)

    monkeypatch.setattr(ray_executor, "_run_cell_task", dying)
    exp = experiment(tmp_path / "e.yaml", base={"file": str(base)}, targets=[0.4, 0.3], seeds=[0], out=str(out))
    result = run("compare", exp, "--executor", "ray")
    assert result.exit_code == 2, result.output
    assert "1 of 2 cells run failed" in result.output and "Traceback" not in result.output
    assert len(list(tries.iterdir())) == 2  # two processes: the first try and the one retry
    (failure,) = [json.loads(p.read_text()) for p in (out / "failed").glob("*.json")]
    assert "WorkerCrashedError" in failure["error"] and failure["target"] == 0.4
    (good,) = records(out)
    assert without_timings(records(out)[good]) == without_timings(records(full)[good])


def test_ctrl_c_cancels_the_tasks_in_flight(cluster, base, tmp_path, monkeypatch):
    """Ctrl-C while the driver waits for its first result: every task is cancelled (not left running on the
    cluster, which this process's connection would keep alive), and compare ends with one line, exit 130. Under load
    Ray lost one cancel in two runs of this test (that task ran to its end) until the driver cancelled again."""
    previous = signal.getsignal(signal.SIGINT)  # the driver ignores a second Ctrl-C from then on: restored below
    real_wait, waited = ray.wait, []

    def interrupted(refs, **kw):
        if waited:  # the driver's own waits for the cancelled tasks to end
            return real_wait(refs, **kw)
        waited.extend(refs)
        ready, _ = real_wait(refs, num_returns=len(refs), timeout=0)
        assert not ready  # a cell takes seconds: none can have finished yet, so each one must be cancelled
        raise KeyboardInterrupt

    monkeypatch.setattr(ray, "wait", interrupted)
    out = tmp_path / "out"
    exp = experiment(tmp_path / "e.yaml", base={"file": str(base)}, out=str(out))
    try:
        result = run("compare", exp, "--executor", "ray")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert result.exit_code == 130, result.output
    assert "Ray tasks cancelled" in result.output and "Traceback" not in result.output
    assert len(waited) == 4
    for ref in waited:
        with pytest.raises(ray.exceptions.TaskCancelledError):
            ray.get(ref, timeout=120)
    assert not (out / "records").exists() and not list((out / "pending").glob("*"))


def test_shared_dir_gives_the_same_records_and_the_files_come_through_it(ray_grid, base, tmp_path, monkeypatch):
    """With --shared-dir the tasks return nothing: their model files and records reach the driver through the
    folder (seen there when the driver collects them, gone once collected), and the records equal those of the
    grid that sent the bytes back. The flag overrides the experiment's `shared_dir`."""
    from prune_cli.run import ray_executor

    _, full, _ = ray_grid
    shared, out = tmp_path / "shared", tmp_path / "out"
    shared.mkdir()
    real_deliver, delivered = ray_executor._deliver, []

    def deliver(result, key, pending, folder, base_file):
        files = sorted(p.name for p in shared.glob(f"*/pending/{key}.*"))
        delivered.append((result, files))
        real_deliver(result, key, pending, folder, base_file)
        assert not list(shared.glob(f"*/pending/{key}.*"))  # collected: the driver removes them

    monkeypatch.setattr(ray_executor, "_deliver", deliver)
    exp = experiment(tmp_path / "e.yaml", base={"file": str(base)}, seeds=[0], out=str(out),
                     shared_dir=str(tmp_path / "missing"))  # fmt: skip
    refused = run("compare", exp, "--executor", "ray")  # the experiment's folder is checked before any work
    assert refused.exit_code == 2 and f"--shared-dir {tmp_path / 'missing'} does not exist" in refused.output
    assert len(refused.output.strip().splitlines()) == 1 and not out.exists()
    result = run("compare", exp, "--executor", "ray", "--shared-dir", shared)
    assert result.exit_code == 0, result.output
    assert "2 cells run, 0 reused" in result.output
    assert len(delivered) == 2
    for returned, files in delivered:
        assert returned is None  # the task sent no bytes (and no record) back
        assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".safetensors")
    assert not list(shared.iterdir())  # this run's folder is removed at the end
    by_shared, by_bytes = records(out), records(full)
    assert len(by_shared) == 2 and not (out / "pending").exists()
    for key, r in by_shared.items():
        assert r["config"] == by_bytes[key]["config"] and r["base_file"] == by_bytes[key]["base_file"] == str(base)
        assert r["after"]["latency_b1_ms"] > 0  # timed here, after the grid
        assert without_timings(r) == without_timings(by_bytes[key]), key
