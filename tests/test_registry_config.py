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


# ------------------------------------------------------------------------------------------ strict YAML
def _yaml(tmp_path, text):
    from prune_cli.config import load_yaml

    path = tmp_path / "e.yaml"
    path.write_text(text)
    return load_yaml(path)


def test_yaml_duplicate_keys_are_refused_with_their_lines_and_merge_keys_still_work(tmp_path):
    with pytest.raises(BadConfig, match=r"duplicate key 'lr' at line 3 \(first at line 2\)"):
        _yaml(tmp_path, "finetune:\n  lr: 0.1\n  lr: 0.2\n")
    merged = _yaml(tmp_path, "d: &d {epochs: 1, lr: 0.5}\nfinetune: {<<: *d, lr: 0.02}\n")
    assert merged["finetune"] == {"epochs": 1, "lr": 0.02}  # a key after a merge overrides it: not a duplicate


def test_yaml_aliases_that_expand_too_far_are_refused_within_a_second(tmp_path):
    import time

    from prune_cli.config import MAX_YAML_VALUES

    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]  # 9**10 values
    t0 = time.perf_counter()
    with pytest.raises(BadConfig, match="more than 5,000 values"):
        _yaml(tmp_path, "\n".join(lines))
    assert time.perf_counter() - t0 < 1.0
    # a few small aliases are fine: the bound counts what they expand to
    small = _yaml(tmp_path, "a: &a [1, 2, 3]\nb: [*a, *a, *a]\n")
    assert small["b"] == [[1, 2, 3]] * 3 and 3 * 4 < MAX_YAML_VALUES


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("a: &a [1, *a]\n", "inside its anchor"),  # a list that contains itself
        ("a: " + "[" * 2000 + "]" * 2000 + "\n", "nesting deeper"),  # RecursionError in PyYAML's composer
        ("a0: &a0 [x]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, 60)), "nesting deeper"),
        ("a: !!python/object/apply:os.system ['true']\n", "not valid YAML"),  # never constructs Python objects
        ("a: [1, 2\n", "not valid YAML"),
    ],
)
def test_yaml_cycles_deep_nesting_and_python_tags_are_refused(tmp_path, text, problem):
    with pytest.raises(BadConfig, match=problem):
        _yaml(tmp_path, text)


def test_yaml_that_is_not_utf8_is_refused(tmp_path):
    from prune_cli.config import load_yaml

    path = tmp_path / "e.yaml"
    path.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(BadConfig, match="not UTF-8"):
        load_yaml(path)


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        ({"q": [1, 2]}, "must be a single int"),
        ({"q": float("inf")}, "must be int"),
        ({"solver": {"a": 1}}, "must be one of"),
        ({1: 2}, "is not a name"),
    ],
)
def test_build_dataclass_refuses_values_of_the_wrong_shape(values, problem):
    with pytest.raises(BadConfig, match=problem):
        build_dataclass(Opts, values)


def test_lists_and_mappings_are_refused_as_scalars_and_vice_versa():
    from prune_cli.config import convert

    assert convert("0.3,0.5", tuple[float, ...], "targets") == (0.3, 0.5)
    with pytest.raises(BadConfig, match=r"must be a list, e\.g\. \[0\.5\]"):
        convert(0.5, tuple[float, ...], "targets")
    with pytest.raises(BadConfig, match="must be a mapping"):
        convert(["a", "b"], dict[str, object], "options")


def test_a_long_run_of_brackets_is_refused_before_the_scanner_reads_ahead(tmp_path):
    import time

    # PyYAML's scanner reads 1024 characters ahead of each "[" and checks every open one per token: without a bound
    # at the scanner this takes about a second on a busy 2-core machine; with it, milliseconds.
    t0 = time.perf_counter()
    with pytest.raises(BadConfig, match="nesting deeper than 32 levels at line 1"):
        _yaml(tmp_path, "a: " + "[" * 1200 + "]" * 1200 + "\n")
    assert time.perf_counter() - t0 < 0.25


def test_a_document_too_large_for_an_experiment_is_refused_before_parsing(tmp_path):
    from prune_cli.config import MAX_YAML_BYTES

    with pytest.raises(BadConfig, match="larger than 64 KiB"):
        _yaml(tmp_path, "a: [" + ",".join(["1"] * (MAX_YAML_BYTES // 2 + 1)) + "]\n")
    with pytest.raises(BadConfig, match="more than 5,000 values"):  # small enough in bytes, too many values
        _yaml(tmp_path, "a: [" + ",".join(["1"] * 6000) + "]\n")
