"""Top-1 lives in the engine; here: parameters, MACs (static and per input), latency and file size, and a model's
measurement for a run record (`measure`, `time_side_by_side`: figures with the conditions they were taken under).

Counting convention (METHODS.md): MACs of conv and linear layers only, i.e. `torch.utils.flop_counter` FLOPs of
convolution and matrix-multiply ops, halved. Parameters: weights and biases of conv and linear layers (the
convention of the CIFAR tables; BatchNorm parameters are not counted).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from prune_cli.data import splits as D

_COUNTED_OPS = ("convolution", "mm", "addmm", "bmm", "baddbmm")


def count_params(model: nn.Module) -> int:
    """Weights + biases of every Conv and Linear layer."""
    total = 0
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            total += m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
    return total


@torch.no_grad()
def count_macs(model: nn.Module, example_input: Tensor) -> int:
    """MACs of one forward pass on `example_input` (1, C, H, W), conv + linear only, per image."""
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(example_input)
    model.train(was_training)
    flops = 0
    for op, n in counter.get_flop_counts().get("Global", {}).items():
        if str(op).split(".")[1] in _COUNTED_OPS:
            flops += n
    return flops // 2 // example_input.shape[0]


@dataclass
class Latency:
    """Wall time of one forward pass at a batch size, over repeated runs after warm-up."""

    batch: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    threads: int
    device: str

    @property
    def spread_ms(self) -> float:
        return self.p90_ms - self.p10_ms


@torch.no_grad()
def measure_latency(
    model: nn.Module | Callable[[Tensor], Tensor],
    input_shape: tuple[int, ...],
    batch: int = 1,
    *,
    pool: Tensor | None = None,
    repeats: int | None = None,
    warmup: int = 3,
    max_seconds: float = 2.0,
    device: torch.device | None = None,
) -> Latency:
    """Median and 10th/90th percentile of the forward time of `model` at batch size `batch`.

    pool: (N, C, H, W) images on the device; the passes take its consecutive batches in turn, as a dynamic model's
    cost depends on its input (and a repeated input would only ever hit its caches). None: one random batch of
    `input_shape` (C, H, W), enough for a static model. Runs `warmup` passes first, then `repeats` timed passes (by
    default as many as fit in `max_seconds`, at least 5, at most 1000). `model` may be any callable when `pool`
    or `device` says where to run.
    """
    if isinstance(model, nn.Module):
        model.eval()
    if pool is None:
        device = device or next(model.parameters()).device
        pool = torch.randn(batch, *input_shape, device=device)
    elif len(pool) < batch:  # fewer images than a batch: repeat them
        pool = pool.repeat(-(-batch // len(pool)), *([1] * (pool.dim() - 1)))
    device = pool.device
    batches = [pool[i : i + batch] for i in range(0, len(pool) - batch + 1, batch)]

    def once(i: int) -> float:
        xb = batches[i % len(batches)]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(xb)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for i in range(warmup):
        once(i)
    times: list[float] = []
    budget_end = time.perf_counter() + max_seconds
    while True:
        times.append(once(warmup + len(times)))
        if repeats is not None:
            if len(times) >= repeats:
                break
        elif len(times) >= 5 and time.perf_counter() > budget_end:
            break
        if len(times) >= 1000:
            break
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return Latency(
        batch=batch,
        median_ms=statistics.median(times) * 1e3,
        p10_ms=q[0] * 1e3,
        p90_ms=q[-1] * 1e3,
        repeats=len(times),
        threads=torch.get_num_threads(),
        device=str(device),
    )


def latency_in_turns(
    models: Sequence[nn.Module | Callable[[Tensor], Tensor]], pool: Tensor, batch: int, *, max_seconds: float = 2.0,
    rounds: int = 4,
) -> list[tuple[float, float]]:  # fmt: skip
    """(median ms, spread ms) of each model at `batch` on `pool` (as in `measure_latency`), the models taking turns:
    `rounds` turns each of about `max_seconds / rounds`, each figure the median of its turns. A shared CPU's speed
    drifts by up to 2x within minutes (benchmarks/README.md); turns that alternate share the drift, so the ratio of
    two models stays true."""
    turns: list[list[Latency]] = [[] for _ in models]
    for _ in range(rounds):
        for model, times in zip(models, turns, strict=True):
            times.append(
                measure_latency(model, tuple(pool.shape[1:]), batch, pool=pool, max_seconds=max_seconds / rounds)
            )
    return [(statistics.median(t.median_ms for t in ts), statistics.median(t.spread_ms for t in ts)) for ts in turns]


def file_size(path: str | Path) -> int:
    return os.path.getsize(path)


@torch.no_grad()
def per_input_macs(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """MACs executed per input for batch `x`: (total (N,), method overhead (N,)).

    For a static model every input costs the same; dynamic models (HASTE, ManiDP) report their own.
    """
    from prune_cli.api import dynamic

    if dynamic.is_dynamic(model):
        return dynamic.per_input_macs(model, x)
    n = x.shape[0]
    macs = count_macs(model, x[:1])
    return torch.full((n,), float(macs)), torch.zeros(n)


def measure(
    model: nn.Module, splits: D.Splits, *, latency_batches: Sequence[int] = (1, 64), device: torch.device | None = None,
    latency_seconds: float = 2.0, runtime: str = "torch",
) -> dict[str, Any]:  # fmt: skip
    """Parameters, MACs per image, and latency at each batch size (see `time_side_by_side`)."""
    from prune_cli.api import dynamic

    device = device or next(model.parameters()).device
    x = D.to_float(splits.train.x[:1], splits, device=device)  # the example input (run.loading)
    out: dict[str, Any] = {"params": count_params(model), "macs": count_macs(model, x)}
    if dynamic.is_dynamic(model):  # the cost depends on the input: average the executed MACs over test images
        per_input, overhead = per_input_macs(model, D.to_float(splits.test.x[:1024], splits, device=device))
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

    The models take turns (`latency_in_turns`): `rounds` turns each of about `latency_seconds / rounds` per
    batch size, each figure the median of its turns. `runtime` onnxruntime: each model is exported to ONNX and timed
    in an ONNX Runtime session (CPU; see store/onnx.py).
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
        timed = latency_in_turns(models, pool, b, max_seconds=latency_seconds, rounds=rounds)
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
