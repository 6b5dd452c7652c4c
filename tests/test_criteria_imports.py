"""Criteria import only the API: every module under criteria/ imports nothing of the project but `prune_cli.api`
(and its submodules) and `prune_cli.errors`. What several criteria need is offered there, so a criterion never
reaches into the engine's internals, the zoo (`models`), or another criterion.

A criterion too large for one module is a package (criteria/manidp/): its modules may import each other, never
another criterion's. The criteria package's own __init__ imports nothing of the project (it finds the criteria by
listing its folder). Read from the source (ast), imports inside functions included.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("prune_cli", "criteria", "models")  # the distribution's import packages (pyproject.toml)
ALLOWED = ("prune_cli.api", "prune_cli.errors")


def _within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _imported(tree: ast.AST, package: str) -> list[tuple[int, list[str]]]:
    """(line, the module names an import may mean) for every import in `tree`, relative ones resolved against
    `package`: `from A import b` may mean module A or module A.b."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, [a.name]) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out += [(node.lineno, [base, f"{base}.{a.name}"]) for a in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "import_module",
            "__import__",
        ):
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                out.append((node.lineno, [node.args[0].value]))
    return out


def violations(folder: Path) -> list[str]:
    """'file:line module' for every import of the project that a module under `folder` (the criteria package)
    may not make."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        parts = path.relative_to(folder.parent).with_suffix("").parts
        package = ".".join(parts[:-1])  # the package a relative import starts from (for __init__: its own)
        # a criterion's own module or package (criteria.<name>): a package's modules may import each other
        own = (".".join(parts[:2]),) if len(parts) > 2 or path.name != "__init__.py" else ()
        for line, names in _imported(ast.parse(path.read_text(), str(path)), package):
            if not _within(names[0], PROJECT):
                continue
            if any(_within(n, ALLOWED) or _within(n, own) for n in names):
                continue
            found.append(f"{path.relative_to(folder.parent)}:{line} {names[-1]}")
    return found


def test_criteria_import_only_the_api():
    bad = violations(ROOT / "criteria")
    assert not bad, "criteria may import only prune_cli.api (and submodules) and prune_cli.errors:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    ("source", "caught"),
    [
        ("from prune_cli.surgery import prune", True),
        ("from prune_cli import surgery", True),
        ("import models.resnet", True),
        ("from models.vgg import VGG", True),
        ("def f():\n    from prune_cli.dynamic import per_input_macs", True),
        ("from criteria.similarity import following_norms", True),
        ("from . import similarity", True),
        ("import importlib\nimportlib.import_module('prune_cli.selection.plan')", True),
        ("from prune_cli.api import Context\nfrom prune_cli.api.graph import trace", False),
        ("from prune_cli import api, errors\nfrom prune_cli.errors import BadValue", False),
        ("from criteria.mine_helpers import x", True),
        ("from criteria.big.train import x", True),
        ("import torch\nfrom sklearn.linear_model import Lasso", False),
    ],
)
def test_the_check_catches_what_it_guards(tmp_path, source, caught):
    """The check itself: a planted import of the engine, the zoo or another criterion is reported; the API, the
    errors and third-party packages are not; a criterion package's modules may import each other."""
    folder = tmp_path / "criteria"
    (folder / "big").mkdir(parents=True)
    (folder / "__init__.py").write_text("import importlib\n")
    (folder / "similarity.py").write_text("")
    (folder / "mine_helpers.py").write_text("")
    (folder / "big" / "__init__.py").write_text("from criteria.big.train import fit\nfrom .sites import find\n")
    (folder / "big" / "train.py").write_text("def fit():\n    from criteria.big import gates\n")
    (folder / "big" / "sites.py").write_text("from . import train\n")
    (folder / "mine.py").write_text(source + "\n")
    bad = violations(folder)
    assert bool(bad) == caught, bad
    assert all(b.startswith("criteria/mine.py:") for b in bad)
