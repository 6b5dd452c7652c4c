"""Model files: one `.safetensors` file with the architecture as JSON in its metadata. No pickle, ever.

Metadata keys:
    "prune_cli": format tag
    "arch": {"factory": name, "kwargs": {...}, "widths": {module: {type, in, out, groups}}, "dynamic": {...}|null}
    "info": free JSON (dataset, metrics, criterion, provenance)

Loading builds the original model from its factory, shrinks each recorded layer whose width differs to the
recorded width, re-wraps dynamic methods through their criterion's `rebuild`, then loads the weights strictly.

Nothing read from a file is executed. The metadata is checked as data before anything is built: the factory must be
in the zoo or a torchvision classifier, or a `package.module:factory` that the caller trusts for this run
(`trust=`, the CLI's `--trust-factory`); its arguments must be the factory's own parameters with JSON values of the
right type; widths may only shrink the original layers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save_model as _st_save_model
from torch import nn

import models
from prune_cli.errors import BadModelFile, PruneCliError
from prune_cli.store.files import atomic_write

FORMAT = "prune-cli/1"
_RESIZABLE = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)


def module_widths(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per Conv2d / Linear / BatchNorm module its type and channel widths (what pruning changes)."""
    out: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            out[name] = {"type": "Conv2d", "in": m.in_channels, "out": m.out_channels, "groups": m.groups}
        elif isinstance(m, nn.Linear):
            out[name] = {"type": "Linear", "in": m.in_features, "out": m.out_features}
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            out[name] = {"type": type(m).__name__, "in": m.num_features, "out": m.num_features}
    return out


def save_model(model: nn.Module, path: str | Path, **info: Any) -> Path:
    """Write `model` (built by `models.create_model`, possibly pruned or wrapped) to a `.safetensors` file.

    `info` is stored as JSON (must be JSON-serialisable). `dynamic=` (a JSON dict with a "criterion" key) marks a
    dynamic model to be re-wrapped on load.
    """
    arch = getattr(model, "prune_cli_arch", None)
    if arch is None:
        raise PruneCliError("this model was not built by prune-cli (models.create_model), so it cannot be saved")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise BadModelFile(f"model files must end in .safetensors, got {path.name!r}")
    dynamic = info.pop("dynamic", None) or getattr(model, "prune_cli_dynamic", None)
    metadata = {
        "prune_cli": FORMAT,
        "arch": json.dumps({**arch, "widths": module_widths(model), "dynamic": dynamic}),
        "info": json.dumps(info, default=str),
    }
    with atomic_write(path) as tmp:
        # safetensors' save_model de-duplicates shared tensors, which save_file refuses.
        _st_save_model(model, str(tmp), metadata=metadata)
    return path


def read_metadata(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(arch, info) of a model file, without loading the weights; their shapes checked (see `check_arch`)."""
    path = Path(path)
    if not path.is_file():
        raise BadModelFile(f"no model file at {path}")
    with open(path, "rb") as f:
        head = f.read(9)
    # A safetensors file starts with an 8-byte header length, then its JSON header; torch.save writes a zip
    # archive (PK) or, in its legacy format, a pickle (0x80 protocol byte).
    if head[8:9] != b"{" and (head[:2] == b"PK" or head[:1] == b"\x80"):
        raise BadModelFile(
            f"{path} is a PyTorch pickle (torch.save); prune-cli reads only .safetensors model files, "
            "never pickles (to start from your own weights use `--model FACTORY --weights FILE`)"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise BadModelFile(f"{path} is not a readable .safetensors file ({exc})") from exc
    if meta.get("prune_cli") != FORMAT:
        raise BadModelFile(f"{path} is a safetensors file but not a prune-cli model file (no architecture metadata)")
    try:
        arch, info = json.loads(meta["arch"]), json.loads(meta.get("info", "{}"))
    except (KeyError, json.JSONDecodeError, RecursionError) as exc:
        raise BadModelFile(f"{path} has corrupt prune-cli metadata ({exc})") from exc
    return check_arch(arch, path), check_info(info, path)


def check_arch(arch: object, source: object = "the model file") -> dict[str, Any]:
    """`arch` if it has the shape `save_model` writes (types and signs only; what fits the factory is checked when
    building). Raises BadModelFile naming the first fault."""
    if not isinstance(arch, dict):
        raise BadModelFile(f"{source}: the architecture must be a mapping, not {type(arch).__name__}")
    if not isinstance(arch.get("factory"), str) or not arch["factory"]:
        raise BadModelFile(f"{source}: the architecture names no model factory")
    if not isinstance(arch.get("kwargs", {}), dict):
        raise BadModelFile(f"{source}: the factory arguments must be a mapping, not {type(arch['kwargs']).__name__}")
    widths = arch.get("widths", {})
    if not isinstance(widths, dict):
        raise BadModelFile(f"{source}: the layer widths must be a mapping, not {type(widths).__name__}")
    for name, spec in widths.items():
        _check_width(name, spec, source)
    dynamic = arch.get("dynamic")
    if dynamic is not None and not (isinstance(dynamic, dict) and isinstance(dynamic.get("criterion"), str)):
        raise BadModelFile(f"{source}: the dynamic-method state must be a mapping naming its criterion")
    return arch


def _check_width(name: str, spec: object, source: object) -> None:
    types = {cls.__name__ for cls in _RESIZABLE}
    if not isinstance(spec, dict) or spec.get("type") not in types:
        raise BadModelFile(f"{source}: layer {name!r} must be recorded as one of {sorted(types)} with its widths")
    for key in ("in", "out") + (("groups",) if "groups" in spec else ()):
        value = spec.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BadModelFile(f"{source}: layer {name!r} has {key}={value!r}; widths must be positive integers")
    groups = spec.get("groups", 1)
    if spec["in"] % groups or spec["out"] % groups:
        raise BadModelFile(f"{source}: layer {name!r} has {groups} groups, which do not divide its widths")


def check_info(info: object, source: object = "the model file") -> dict[str, Any]:
    """The file's free-form provenance, with the fields that loading uses checked."""
    if not isinstance(info, dict):
        raise BadModelFile(f"{source}: the info metadata must be a mapping, not {type(info).__name__}")
    shape = info.get("input_shape")
    if shape is not None and not (
        isinstance(shape, list)
        and len(shape) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape)
        and math.prod(shape) <= MAX_INPUT_VALUES
    ):
        raise BadModelFile(f"{source}: input_shape {shape!r} is not a (channels, height, width) of positive sizes")
    norm = info.get("normalisation")
    if norm is not None and not (
        isinstance(norm, dict)
        and all(
            isinstance(norm.get(k), list) and norm[k] and all(isinstance(v, (int, float)) for v in norm[k])
            for k in ("mean", "std")
        )
        and all(v > 0 for v in norm["std"])
    ):
        raise BadModelFile(f"{source}: normalisation must hold lists of numbers 'mean' and 'std' (std > 0)")
    for key in ("dataset", "data_dir"):
        if info.get(key) is not None and not isinstance(info[key], str):
            raise BadModelFile(f"{source}: {key} must be a string")
    return info


MAX_INPUT_VALUES = 1 << 26  # one input image of at most this many values (64M): an input_shape cannot exhaust memory


def build_architecture(
    arch: dict[str, Any], *, trust: Collection[str] = (), source: object = "the model file"
) -> nn.Module:
    """The (possibly pruned / wrapped) module described by `arch`, with fresh weights.

    `trust`: user factories (`package.module:factory`) that may be imported and called for this run; a file naming
    another one is refused before anything of it is imported.
    """
    arch = check_arch(arch, source)
    factory = models.check_file_factory(arch["factory"], trust, str(source))
    kwargs = models.check_file_kwargs(factory, arch.get("kwargs", {}), str(source))
    model = models.create_model(factory, **kwargs)
    modules = dict(model.named_modules())
    for name, spec in arch.get("widths", {}).items():
        current = modules.get(name)
        if current is None:
            raise BadModelFile(f"{source} names layer {name!r}, which {factory} does not have")
        if type(current).__name__ != spec["type"]:
            raise BadModelFile(
                f"{source}: layer {name!r} is a {type(current).__name__} in {factory}, not {spec['type']}"
            )
        have = module_widths_one(current)
        if spec["in"] > have[0] or spec["out"] > have[1]:
            raise BadModelFile(
                f"{source}: layer {name!r} is recorded {spec['in']}->{spec['out']} wide, wider than {factory}'s "
                f"{have[0]}->{have[1]}; pruning only removes channels"
            )
        if have != (spec["in"], spec["out"]):
            _set_module(model, name, resized(current, spec["in"], spec["out"], spec.get("groups")))
    if arch.get("dynamic"):
        from prune_cli.api import DynamicCriterion, get_criterion

        config = dict(arch["dynamic"])
        criterion = get_criterion(config["criterion"])  # the file names it; its `rebuild` re-wraps the base model
        if not issubclass(criterion, DynamicCriterion):
            raise BadModelFile(f"{source}: criterion {config['criterion']!r} makes no dynamic model to rebuild")
        try:
            model = criterion.rebuild(model, config)
        except PruneCliError:
            raise
        except Exception as exc:  # the state is data from the file: any fault in it is the file's
            raise BadModelFile(f"{source}: malformed {config['criterion']} state ({_first_line(exc)})") from exc
        model.prune_cli_dynamic = config
    model.prune_cli_arch = {"factory": factory, "kwargs": kwargs}
    return model


def load_model(path: str | Path, device: torch.device | str = "cpu", *, trust: Collection[str] = ()) -> nn.Module:
    """Rebuild the model stored in `path` and load its weights (strict). The model is in eval mode.

    `trust`: user factories the file may name (see `build_architecture`); the zoo and torchvision need none.
    """
    arch, info = read_metadata(path)
    model = build_architecture(arch, trust=trust, source=path)
    try:
        state = load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as exc:
        raise BadModelFile(f"{path}: cannot read weights ({exc})") from exc
    # save_model dropped duplicates of shared tensors; fill them back from the model's own aliases.
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a tensor whose shape does not fit its layer
        raise BadModelFile(f"{path}: its weights do not fit its architecture ({_first_line(exc)})") from exc
    shared = {k for k in missing if _is_alias(model, k, state)}
    missing = [k for k in missing if k not in shared]
    if missing or unexpected:
        raise BadModelFile(
            f"{path} does not fit its architecture: missing {missing[:3]}, unexpected {list(unexpected)[:3]}"
        )
    model.prune_cli_info = info
    return model.to(device).eval()


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a user's weights file into `model`: a .safetensors state dict, or a .pt/.pth state dict read with
    `torch.load(weights_only=True)` (tensors only; no code from the file)."""
    path = Path(path)
    if not path.is_file():
        raise BadModelFile(f"no weights file at {path}")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
        model.load_state_dict(state)
    except Exception as exc:
        raise BadModelFile(f"cannot load weights from {path} into this model: {str(exc).splitlines()[0]}") from exc
    return model


def module_widths_one(m: nn.Module) -> tuple[int, int]:
    if isinstance(m, nn.Conv2d):
        return m.in_channels, m.out_channels
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    return m.num_features, m.num_features  # BatchNorm


def resized(m: nn.Module, in_width: int, out_width: int, groups: int | None = None) -> nn.Module:
    """An initialised module like `m` with other channel widths (same hyper-parameters otherwise)."""
    if isinstance(m, nn.Conv2d):
        return nn.Conv2d(
            in_width, out_width, m.kernel_size, m.stride, m.padding, m.dilation,
            groups if groups is not None else m.groups, m.bias is not None, m.padding_mode,
        )  # fmt: skip
    if isinstance(m, nn.Linear):
        return nn.Linear(in_width, out_width, m.bias is not None)
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return type(m)(out_width, m.eps, m.momentum, m.affine, m.track_running_stats)
    raise BadModelFile(f"cannot resize a {type(m).__name__}")


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _is_alias(model: nn.Module, key: str, state: dict) -> bool:
    """True if parameter `key` shares storage with a tensor that is in `state` (tied weights)."""
    tensors = dict(model.state_dict(keep_vars=True))
    ptr = tensors[key].data_ptr()
    return any(k in state and v.data_ptr() == ptr for k, v in tensors.items() if k != key)
