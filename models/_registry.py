"""Model factories by name: our zoo, `torchvision:NAME`, and a user's `package.module:factory`."""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Collection
from typing import Any

from torch import nn

from prune_cli.errors import BadModelFile, BadValue, PruneCliError, UnknownName
from prune_cli.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
register_model = MODELS.register


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style wildcard, e.g. `resnet*`."""
    return MODELS.names(pattern)


# torchvision models with auxiliary classifiers: built without them. Their train-mode forward returns a tuple of
# outputs, which the engine (one logits tensor) cannot train on; eval mode never runs them, so the channel analysis
# cannot see which channels they read, and pruning would leave them at the wrong widths. init_weights=True keeps
# torchvision's own initialisation without its warning that the default will change.
_TORCHVISION_DEFAULTS = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}


def resolve_factory(name: str) -> Callable[..., nn.Module]:
    """The factory behind a model name (registry name, `torchvision:NAME` or `package.module:factory`)."""
    if name.startswith("torchvision:"):
        import torchvision.models as tvm

        arch = name.split(":", 1)[1]
        known = tvm.list_models(module=tvm)
        if arch not in known:
            raise UnknownName("torchvision model", arch, known)
        defaults = _TORCHVISION_DEFAULTS.get(arch, {})
        return lambda **kw: tvm.get_model(arch, weights=None, **{**defaults, **kw})
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise PruneCliError(f"cannot import model module {module_name!r}: {exc}") from exc
        factory = getattr(module, attr, None)
        if not callable(factory):
            raise PruneCliError(f"{module_name!r} has no callable {attr!r} to build a model")
        return factory
    return MODELS.get(name)


def check_file_factory(name: object, trust: Collection[str], source: str = "the model file") -> str:
    """The factory named in a model file, if it may be built: a zoo name, a registered torchvision classifier, or a
    `package.module:factory` that the user trusts for this run. Imports nothing of an untrusted name: a file could
    name `os:system` or a module that acts on import, so resolving it would run the file's code."""
    if not isinstance(name, str) or not name:
        raise BadModelFile(f"{source} names no model factory (architecture 'factory' is {name!r})")
    if name.startswith("torchvision:"):
        import torchvision.models as tvm

        arch = name.split(":", 1)[1]
        if arch not in tvm.list_models(module=tvm):
            raise BadModelFile(f"{source} names {_shown(name)}, which is not a torchvision classifier")
        return name
    if ":" in name:
        if name not in trust:
            raise BadModelFile(
                f"{source} names the model factory {_shown(name)}, which is neither in the zoo nor a torchvision "
                f"classifier; loading it would import and run that code: if you trust it, pass --trust-factory {name}"
            )
        return name
    if name not in MODELS:
        raise UnknownName("model", name, MODELS.names())
    return name


def check_file_kwargs(name: str, kwargs: object, source: str = "the model file") -> dict[str, Any]:
    """A model file's factory arguments, as data: a mapping of the factory's own parameter names to JSON scalars of
    the type of the parameter's default, sizes within bounds. Nothing is passed blindly."""
    if not isinstance(kwargs, dict):
        raise BadModelFile(f"{source}: the factory arguments must be a mapping, not {type(kwargs).__name__}")
    if name.startswith("torchvision:"):
        # Builders take **kwargs for their model class; a file may set only what create_model records.
        allowed: dict[str, Any] | None = {"num_classes": 1000, **_TORCHVISION_DEFAULTS.get(name.split(":", 1)[1], {})}
    else:
        allowed = _parameter_defaults(resolve_factory(name))
    for key, value in kwargs.items():
        if allowed is not None and key not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise BadModelFile(f"{source}: {name} takes no argument {_shown(key)} (it takes: {known})")
        default = allowed.get(key) if allowed is not None else None
        problem = _json_value_problem(value, default)
        if problem:
            raise BadModelFile(f"{source}: argument {key}={_shown(value)} of {name} {problem}")
    return kwargs


MAX_SIZE = 1 << 20  # a bound on any size a file may ask for (classes, channels), so that it cannot exhaust memory


def _json_value_problem(value: object, default: object) -> str | None:
    """Why `value` cannot be passed where the factory's default is `default` (None: it can)."""
    if value is None or isinstance(value, str):
        return None if default is None or isinstance(default, type(value)) else f"must be a {type(default).__name__}"
    if isinstance(value, bool):
        return None if default is None or isinstance(default, bool) else f"must be a {type(default).__name__}"
    if isinstance(value, int):
        if isinstance(default, bool) or isinstance(default, str):
            return f"must be a {type(default).__name__}"
        if isinstance(default, int) and default > 0 and not 1 <= value <= MAX_SIZE:
            return f"must be a size from 1 to {MAX_SIZE}"
        return None if abs(value) <= MAX_SIZE else "is out of range"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "must be finite"
        return None if default is None or isinstance(default, float) else f"must be a {type(default).__name__}"
    return "must be a number, a string, true/false or null"


def _parameter_defaults(factory: Callable) -> dict[str, Any] | None:
    """Each named parameter's default (None where it has none); None if the factory accepts any name."""
    try:
        params = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {
        p.name: None if p.default is inspect.Parameter.empty else p.default
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def create_model(name: str, num_classes: int | None = None, in_channels: int | None = None, **kwargs) -> nn.Module:
    """Build a model. Arguments left as None are not passed, so a factory's own defaults apply.

    Torchvision classifiers take no `in_channels` (they are RGB; the data loader repeats a grey channel).
    """
    factory = resolve_factory(name)
    args = {"num_classes": num_classes, "in_channels": in_channels, **kwargs}
    args = {k: v for k, v in args.items() if v is not None}
    if name.startswith("torchvision:"):
        args.pop("in_channels", None)
    else:
        accepted = _accepted_kwargs(factory)
        if accepted is not None:
            args = {k: v for k, v in args.items() if k in accepted}
    try:
        model = factory(**args)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise BadValue(f"cannot build model {name!r} with {args}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise PruneCliError(f"model factory {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    # How to rebuild it: model files store this instead of pickled code.
    model.prune_cli_arch = {"factory": name, "kwargs": args}
    return model


def _accepted_kwargs(factory: Callable) -> set[str] | None:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}
