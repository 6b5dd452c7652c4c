"""Model factories by name: our zoo, `torchvision:NAME`, and a user's `package.module:factory`."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

from torch import nn

from prune_cli.errors import BadValue, PruneCliError, UnknownName
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
    except (TypeError, ValueError) as exc:
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
