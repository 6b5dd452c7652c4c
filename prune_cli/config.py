"""Strict mappings -> frozen dataclasses. Unknown keys are errors with a suggestion; values are converted
to the field's annotated type (so `--opt q=3` and YAML `q: 3` give the same Options)."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from prune_cli.errors import BadConfig, UnknownName

D = TypeVar("D")


def build_dataclass(cls: type[D], values: Mapping[str, Any], where: str = "option") -> D:
    """Instantiate dataclass `cls` from `values`, converting strings to the fields' types."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, raw in values.items():
        name = key.replace("-", "_")
        if name not in fields:
            raise UnknownName(where, key, fields)
        kwargs[name] = convert(raw, hints[name], f"{where} {key!r}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise BadConfig(f"bad {where}s {dict(values)}: {exc}") from exc


def parse_key_values(items: list[str] | None) -> dict[str, str]:
    """['a=1', 'b=x'] -> {'a': '1', 'b': 'x'}."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BadConfig(f"expected name=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def convert(raw: Any, annotation: Any, what: str) -> Any:
    """Convert `raw` (often a string from the command line) to `annotation`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null")) and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return convert(raw, arg, what)
            except BadConfig as exc:
                errors.append(str(exc))
        raise BadConfig(errors[0] if errors else f"{what}: cannot convert {raw!r}")
    if origin is typing.Literal:
        for choice in args:
            if str(choice) == str(raw):
                return choice
        raise BadConfig(f"{what} must be one of {', '.join(map(str, args))}; got {raw!r}")
    if origin in (tuple, list):
        items = raw.split(",") if isinstance(raw, str) else list(raw)
        elem = args[0] if args else str
        converted = [convert(i, elem, what) for i in items]
        return tuple(converted) if origin is tuple else converted
    if annotation is bool:
        if isinstance(raw, bool):
            return raw
        if str(raw).lower() in ("1", "true", "yes", "on"):
            return True
        if str(raw).lower() in ("0", "false", "no", "off"):
            return False
        raise BadConfig(f"{what} must be true or false; got {raw!r}")
    if annotation in (int, float, str):
        try:
            value = annotation(raw)
        except (TypeError, ValueError):
            raise BadConfig(f"{what} must be {annotation.__name__}; got {raw!r}") from None
        if annotation is int and isinstance(raw, float) and raw != int(raw):
            raise BadConfig(f"{what} must be an integer; got {raw!r}")
        return value
    return raw
