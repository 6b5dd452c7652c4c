"""Where a command runs: the runtime set-up (seed, threads, device) and the description of the machine that every
model file and run record stores."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch

from prune_cli.config import check_seed
from prune_cli.errors import BadValue


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
