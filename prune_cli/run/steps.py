"""The steps every command shares: runtime set-up, data for a model, model creation, measurement.

The CLI commands, `compare` and the tests call these; they hold no terminal code.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import models
from prune_cli import metrics
from prune_cli.config import check_seed
from prune_cli.data import splits as D
from prune_cli.errors import BadValue
from prune_cli.store.modelfile import load_weights


def setup_runtime(device: str | None = None, threads: int | None = None, seed: int = 0) -> torch.device:
    """Seed torch, set the CPU thread count, and resolve the device name."""
    if threads is not None:
        if threads < 1:
            raise BadValue(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    check_seed(seed)
    torch.manual_seed(seed)
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise BadValue(f"unknown device {device!r} ({exc})") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadValue("--device cuda was asked for, but torch sees no CUDA GPU")
    if dev.type == "meta":  # by name: its first use imports torch's meta kernels, which takes seconds
        raise BadValue("--device meta holds shapes, not data: it cannot run a model (cpu or cuda)")
    try:  # a real computation and a copy back: back-ends absent from this build of torch fail here
        torch.ones(1, device=dev).add(1).cpu()
    except Exception as exc:  # torch raises RuntimeError, NotImplementedError or AssertionError, by back-end
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0]
        raise BadValue(f"--device {device!r} cannot run models here ({first})") from None
    return dev


def input_channels_for(model_name: str) -> int | None:
    """Torchvision classifiers are RGB: grey data is repeated to 3 channels for them."""
    return 3 if model_name.startswith("torchvision:") else None


def load_splits(
    dataset: str, data_dir: str | Path | None = None, *, model_name: str = "", seed: int = 0,
    val_size: int | None = None, calib_size: int | None = None, normalisation: dict | None = None,
) -> D.Splits:  # fmt: skip
    """The dataset's splits for `seed`; `normalisation` is a model file's recorded statistics (see make_splits)."""
    ds = D.load_dataset(dataset, data_dir, channels=input_channels_for(model_name))
    return D.make_splits(ds, val_size=val_size, calib_size=calib_size, seed=seed, normalisation=normalisation)


def normalisation(splits: D.Splits) -> dict[str, list[float]]:
    """The input statistics to record in a model file: what a user must normalise its inputs with."""
    return {"mean": list(splits.mean), "std": list(splits.std)}


def recorded_normalisation(info: dict, dataset: str) -> dict | None:
    """A model file's recorded input statistics, if it was trained on `dataset` (None: compute them)."""
    return info.get("normalisation") if dataset == info.get("dataset") else None


def load_model_and_data(
    model_file: str | Path, dataset: str | None, data_dir: Path | None, *, seed: int = 0,
    device: torch.device | str = "cpu", trust: Collection[str] = (),
) -> tuple[nn.Module, str, D.Splits]:  # fmt: skip
    """A saved model and the splits of its dataset (by default the one recorded in the file). `trust`: the user
    factories the file may name (see `modelfile.load_model`)."""
    from prune_cli.store.modelfile import load_model

    model = load_model(model_file, device, trust=trust)
    info = getattr(model, "prune_cli_info", {})
    dataset = dataset or info.get("dataset")
    if dataset is None:
        raise BadValue(f"{model_file} does not record its dataset: pass --dataset")
    data_dir = data_dir or (Path(info["data_dir"]) if info.get("data_dir") else None)
    splits = load_splits(
        dataset, data_dir, model_name=model.prune_cli_arch["factory"], seed=seed,
        normalisation=recorded_normalisation(info, dataset),
    )  # fmt: skip
    check_runs_on(model, str(model_file), splits, trained_on=info.get("input_shape"))
    return model, dataset, splits


def new_model(name: str, splits: D.Splits, weights: Path | None = None) -> nn.Module:
    """A freshly built model for the data's classes and channels, optionally with a user's weights."""
    in_channels = splits.train.x.shape[1]
    model = models.create_model(name, num_classes=splits.num_classes, in_channels=in_channels)
    if weights is not None:
        load_weights(model, weights)
    check_runs_on(model, name, splits)
    return model


@torch.no_grad()
def check_runs_on(model: nn.Module, name: str, splits: D.Splits, trained_on: Sequence[int] | None = None) -> None:
    """One image through the model before any work, and an output for every class of the data: a model too deep
    for small images (inception_v3 on 8x8 digits pools them away), RGB data for a grey model (`trained_on`: the
    (C, H, W) a model file records) or a dataset with more classes than outputs fail here with one line, not
    minutes later with a traceback."""
    x = example_input(splits).to(next(model.parameters(), torch.empty(0)).device)
    shape = tuple(x.shape[1:])
    recorded = list(trained_on) if isinstance(trained_on, (list, tuple)) and len(trained_on) == 3 else None
    if recorded and isinstance(recorded[0], int) and recorded[0] != shape[0]:
        raise BadValue(
            f"{name} takes {recorded[0]}-channel images, but {splits.dataset}'s have {shape[0]} channels "
            f"(the model was trained on {tuple(recorded)} images)"
        )
    was_training = model.training
    try:
        logits = model.eval()(x)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadValue(f"model {name} cannot run on {shape} images of {splits.dataset}: {first}") from exc
    finally:
        model.train(was_training)
    outputs = logits.shape[-1] if isinstance(logits, torch.Tensor) and logits.dim() == 2 else None
    if outputs is not None and outputs < splits.num_classes:
        raise BadValue(f"{splits.dataset} has {splits.num_classes} classes, but model {name} has {outputs} outputs")


def train_and_save(
    model_name: str, dataset: str, data_dir: str | Path | None, cfg: Any, out: Path, *, weights: Path | None = None,
    device: torch.device | None = None, resume: bool = False, reporter: Any = None, log=lambda m: None,
    save_every: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """Train a new `model_name` on `dataset` with `cfg` (engine.TrainConfig), save it to `out`, return a summary.

    A checkpoint (OUT.ckpt) is written after each epoch so that `resume` can continue an interrupted run. With
    `save_every` N > 0, every N-th epoch before the last is also saved as a model file OUT-epochK.safetensors: the
    same run's early snapshots, for checking whether a criterion ranks an early model as it ranks the final one.
    """
    import time

    from prune_cli import engine
    from prune_cli.store.modelfile import save_model

    splits = load_splits(dataset, data_dir, model_name=model_name, seed=cfg.seed)
    net = new_model(model_name, splits, weights)
    log(f"training {model_name} on {dataset} ({len(splits.train)} train / {len(splits.val)} val images) on {device}")
    checkpoint = out.with_suffix(".ckpt")
    provenance = dict(
        dataset=dataset, input_shape=list(splits.train.x.shape[1:]), data_dir=str(data_dir) if data_dir else None,
        seed=cfg.seed, train=engine.config_dict(cfg), machine=machine(), normalisation=normalisation(splits),
    )  # fmt: skip

    def snapshot(model: nn.Module, epochs_done: int, history: list[dict]) -> None:
        if save_every > 0 and epochs_done % save_every == 0 and epochs_done < cfg.epochs:
            path = snapshot_path(out, epochs_done)
            save_model(model, path, kind="snapshot", epoch=epochs_done, history=list(history), **provenance)
            log(f"saved the epoch-{epochs_done} snapshot to {path}")

    t0 = time.perf_counter()
    result = engine.train(net, splits, cfg, device=device, checkpoint=checkpoint, resume=resume, reporter=reporter,
                          log=log, after_epoch=snapshot)  # fmt: skip
    test = engine.evaluate(net, splits.test, splits, device=device)
    summary = {
        "model": model_name,
        "dataset": dataset,
        "test_top1": test.top1,
        "test_top5": test.top5,
        "val_top1": result.history[-1].get("val_acc") if result.history else None,
        "epochs": cfg.epochs,
        "train_seconds": result.seconds,
        "wall_seconds": time.perf_counter() - t0,
        "images_per_second": result.images_per_second if result.history else None,
    }
    save_model(net.cpu(), out, kind="trained", history=result.history, metrics=summary, **provenance)
    checkpoint.unlink(missing_ok=True)
    return summary


def snapshot_path(out: Path, epoch: int) -> Path:
    """Where `train --save-every` writes the model after `epoch` epochs: OUT-epochK.safetensors."""
    return out.with_name(f"{out.stem}-epoch{epoch}{out.suffix}")


def example_input(splits: D.Splits) -> torch.Tensor:
    """One normalised training image, (1, C, H, W): what tracing and MAC counting run on."""
    return D.to_float(splits.train.x[:1], splits)


def measure(
    model: nn.Module, splits: D.Splits, *, latency_batches: Sequence[int] = (1, 64), device: torch.device | None = None,
    latency_seconds: float = 2.0, runtime: str = "torch",
) -> dict[str, Any]:  # fmt: skip
    """Parameters, MACs per image, and latency at each batch size (see `time_side_by_side`)."""
    from prune_cli.api import dynamic

    device = device or next(model.parameters()).device
    x = example_input(splits).to(device)
    out: dict[str, Any] = {"params": metrics.count_params(model), "macs": metrics.count_macs(model, x)}
    if dynamic.is_dynamic(model):  # the cost depends on the input: average the executed MACs over test images
        per_input, overhead = metrics.per_input_macs(model, D.to_float(splits.test.x[:1024], splits, device=device))
        out.update(macs=float(per_input.mean()), macs_std=float(per_input.std()), overhead_macs=float(overhead.mean()))
    out.update(time_side_by_side([model], splits, latency_batches=latency_batches, device=device,
                                 latency_seconds=latency_seconds, rounds=1, runtime=runtime)[0])  # fmt: skip
    return out


def time_side_by_side(
    models: Sequence[nn.Module], splits: D.Splits, *, latency_batches: Sequence[int] = (1, 64),
    device: torch.device | None = None, latency_seconds: float = 2.0, rounds: int = 4, runtime: str = "torch",
) -> list[dict[str, Any]]:  # fmt: skip
    """Latency of each model at each batch size (median ms, p10-p90 spread, on consecutive batches of test images),
    with the threads, device and load average it was timed under.

    The models take turns (`metrics.latency_in_turns`): `rounds` turns each of about `latency_seconds / rounds` per
    batch size, each figure the median of its turns. `runtime` onnxruntime: each model is exported to ONNX and timed
    in an ONNX Runtime session (CPU; see export.py).
    """
    device = device or next(models[0].parameters()).device
    # Real, varied images: a dynamic model's time depends on them (and on its caches, which one repeated input would
    # always hit). At batch 1 an image comes back after 255 others; a larger batch size gets at least two batches.
    out: list[dict[str, Any]] = [{} for _ in models]
    if latency_batches:
        n = max(256, 2 * max(latency_batches))
        pool = D.to_float(splits.test.x[:n], splits, device=device)
        if runtime != "torch":
            from prune_cli.selection.latency import as_runtime

            models = [as_runtime(m, runtime, pool[:1]) for m in models]
    for b in latency_batches:
        timed = metrics.latency_in_turns(models, pool, b, max_seconds=latency_seconds, rounds=rounds)
        for fields, (median_ms, spread_ms) in zip(out, timed, strict=True):
            fields[f"latency_b{b}_ms"], fields[f"latency_b{b}_spread_ms"] = median_ms, spread_ms
    # Other busy processes make CPU latency meaningless (threads wait for each other's time slices): record it.
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    for fields in out:
        fields.update(threads=torch.get_num_threads(), device=str(device), load_average=load, runtime=runtime)
    return out


def busy_machine_warning(measured: dict[str, Any]) -> str | None:
    """A warning when the machine was busier than its cores while latency was measured, else None. The load average
    counts the timing process's own threads (one process timing on every core reads about the number of cores), so
    it takes half a core more to warn."""
    load, cores = measured.get("load_average"), os.cpu_count() or 1
    if load is not None and measured.get("device") == "cpu" and load > cores + 0.5:
        return (f"the machine was busy while timing (load average {load:.1f} on {cores} cores): "
                "latency figures are unreliable; rerun on an idle machine")  # fmt: skip
    return None


def machine() -> dict[str, Any]:
    """Where a result was measured (stored with every model file and run record)."""
    return {
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_batches(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BadValue(f"latency batches must be integers separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise BadValue(f"latency batches must be positive integers, got {text!r}")
    return values
