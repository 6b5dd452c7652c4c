"""Strict mappings -> frozen dataclasses. Unknown keys are errors with a suggestion; values are converted
to the field's annotated type (so `--opt q=3` and YAML `q: 3` give the same Options).

`load_yaml` reads a user's YAML file strictly: safe types only, duplicate keys are errors (naming the key and
its line), and the document's size, nesting and alias expansion are bounded, so a "billion laughs" file or a
deeply nested one is refused at once instead of exhausting memory, time or the stack.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from prune_cli.errors import BadConfig, BadValue, UnknownName

D = TypeVar("D")

SEED_MAX = 2**32 - 1  # numpy's and scikit-learn's random_state take no larger seed


def check_seed(seed: Any, what: str = "--seed") -> int:
    """`seed` if it is an integer in 0..SEED_MAX, else BadValue."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise BadValue(f"{what} must be an integer in 0..{SEED_MAX}, got {seed!r}")
    return seed


# ------------------------------------------------------------------------------------------------------ YAML
# An experiment file is about 1 KB and 50 values. Pure-Python PyYAML spends up to a fraction of a millisecond per
# value, so these bounds also bound the time a crafted file can take.
MAX_YAML_BYTES = 64 << 10
MAX_YAML_DEPTH = 32  # nesting of mappings and lists
MAX_YAML_VALUES = 5_000  # values in the document with every alias expanded


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, plus: duplicate keys are errors, and nesting and alias expansion are bounded."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._values = 0
        self._sizes: dict[int, tuple[int, int]] = {}
        self._open: list[str | None] = []  # anchors of the nodes being composed: an alias to one would be a cycle

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open:
                raise BadConfig(f"the alias *{event.anchor} at line {event.start_mark.line + 1} is inside its anchor")
            if event.anchor in self.anchors:  # an unknown alias is PyYAML's own error
                size, depth = _expanded(self.anchors[event.anchor], self._sizes)
                self._nest(self._depth + depth, event.start_mark, " with its aliases expanded")
                self._count(size, event.start_mark)
            return super().compose_node(parent, index)
        mark, anchor = event.start_mark, getattr(event, "anchor", None)
        self._depth += 1
        self._nest(self._depth, mark)
        self._open.append(anchor)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
            self._open.pop()
        self._count(1, mark)
        return node

    def _nest(self, depth: int, mark: Any, how: str = "") -> None:
        if depth > MAX_YAML_DEPTH:
            raise BadConfig(f"nesting deeper than {MAX_YAML_DEPTH} levels{how} at line {mark.line + 1}")

    def fetch_flow_collection_start(self, TokenClass: Any) -> None:  # noqa: N803  (PyYAML's name)
        # The scanner reads up to 1024 characters ahead of each "[" or "{" (it might start a key), and each token it
        # reads checks every open one: a long run of brackets takes seconds before the composer sees any of them.
        if self.flow_level >= MAX_YAML_DEPTH:
            raise BadConfig(f"nesting deeper than {MAX_YAML_DEPTH} levels at line {self.line + 1}")
        super().fetch_flow_collection_start(TokenClass)

    def _count(self, values: int, mark: Any) -> None:
        self._values += values
        if self._values > MAX_YAML_VALUES:
            raise BadConfig(
                f"more than {MAX_YAML_VALUES:,} values (counting what aliases expand to) by line {mark.line + 1}: "
                "not an experiment file"
            )

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`, then keys that override it
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    earlier = first.get(key)
                except TypeError:  # an unhashable key: PyYAML's own error follows
                    continue
                line = key_node.start_mark.line + 1
                if earlier is not None:
                    raise BadConfig(f"duplicate key {key!r} at line {line} (first at line {earlier})")
                first[key] = line
        return super().construct_mapping(node, deep=deep)


def _expanded(node: Any, memo: dict[int, tuple[int, int]]) -> tuple[int, int]:
    """(values, nesting depth) under `node` with every alias expanded; memoised by node, so shared nodes cost one
    visit each (the counts themselves may be astronomically large: that is what they are for)."""
    key = id(node)
    if key not in memo:
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        below = [_expanded(c, memo) for c in children]
        memo[key] = (1 + sum(s for s, _ in below), 1 + max((d for _, d in below), default=0))
    return memo[key]


def load_yaml(path: str | Path) -> Any:
    """The YAML document in `path`, read strictly (see the module docstring). Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise BadValue(f"{path} does not exist or is not a file")
    if path.stat().st_size > MAX_YAML_BYTES:
        raise BadConfig(f"{path} is larger than {MAX_YAML_BYTES >> 10} KiB: not an experiment file")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BadConfig(f"{path} is not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#04x})") from None
    except OSError as exc:
        raise BadValue(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506  (a SafeLoader subclass)
    except BadConfig as exc:
        raise BadConfig(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
        raise BadConfig(f"{path} is not valid YAML: {problem}{where}") from None


def build_dataclass(cls: type[D], values: Mapping[str, Any], where: str = "option") -> D:
    """Instantiate dataclass `cls` from `values`, converting strings to the fields' types."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, raw in values.items():
        if not isinstance(key, str):
            raise BadConfig(f"{where} {key!r} is not a name")
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
        if not isinstance(raw, (str, list, tuple)):
            raise BadConfig(f"{what} must be a list, e.g. [{raw!r}]; got {raw!r}")
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
    if origin is dict or annotation is dict:
        if not isinstance(raw, Mapping) or not all(isinstance(k, str) for k in raw):
            raise BadConfig(f"{what} must be a mapping of names to values; got {raw!r}")
        return dict(raw)
    if annotation in (int, float, str):
        if isinstance(raw, (Mapping, list, tuple, set)):
            raise BadConfig(f"{what} must be a single {annotation.__name__}; got {raw!r}")
        try:
            value = annotation(raw)
        except (TypeError, ValueError, OverflowError):
            raise BadConfig(f"{what} must be {annotation.__name__}; got {raw!r}") from None
        if annotation is int and isinstance(raw, float) and raw != int(raw):
            raise BadConfig(f"{what} must be an integer; got {raw!r}")
        return value
    return raw
