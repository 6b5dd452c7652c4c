"""The registry (duplicates are errors, did-you-mean, entry points) and strict option parsing."""

from dataclasses import dataclass
from typing import Literal

import pytest

from prune_cli.config import build_dataclass, parse_key_values
from prune_cli.errors import BadConfig, PruneCliError, UnknownName
from prune_cli.registry import Registry


def test_duplicate_names_are_errors():
    reg = Registry("thing")

    @reg.register("a")
    def first():
        pass

    with pytest.raises(PruneCliError, match="duplicate thing name 'a'"):
        reg.register("a")(lambda: None)


def test_unknown_name_suggests():
    reg = Registry("thing")
    reg.add("sensitivity", object())
    with pytest.raises(UnknownName, match="did you mean 'sensitivity'"):
        reg.get("sensitivty")


def test_entry_points_are_loaded_lazily(monkeypatch):
    from importlib import metadata

    class EP:
        name, value = "plug", "pkg:Plug"

        def load(self):
            return "loaded"

    calls = []
    monkeypatch.setattr(metadata, "entry_points", lambda group: calls.append(group) or [EP()])
    reg = Registry("criterion", entry_point_group="prune_cli.criteria")
    reg.add("builtin", "b")
    assert reg.get("builtin") == "b" and calls == []  # built-ins need no entry-point scan
    assert reg.get("plug") == "loaded" and calls == ["prune_cli.criteria"]
    assert "entry point pkg:Plug" in reg.origin("plug")


@dataclass(frozen=True)
class Opts:
    q: int = 2
    solver: Literal["lda", "logistic"] = "lda"
    shrink: float | None = None
    merge: bool = True


def test_build_dataclass_converts_and_rejects():
    assert build_dataclass(Opts, {"q": "3", "solver": "logistic", "shrink": "0.5", "merge": "false"}) == Opts(
        3, "logistic", 0.5, False
    )
    assert build_dataclass(Opts, {"shrink": "none"}).shrink is None
    with pytest.raises(UnknownName, match="did you mean 'solver'"):
        build_dataclass(Opts, {"solvr": "lda"})
    with pytest.raises(BadConfig, match="must be one of lda, logistic"):
        build_dataclass(Opts, {"solver": "svm"})
    with pytest.raises(BadConfig, match="must be int"):
        build_dataclass(Opts, {"q": "two"})


def test_parse_key_values():
    assert parse_key_values(["a=1", "b = x"]) == {"a": "1", "b": "x"}
    with pytest.raises(BadConfig):
        parse_key_values(["novalue"])
