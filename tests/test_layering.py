"""The house rule, checked on the source: each package of depthkv imports only the packages below it.

models, scorers, allocation, tasks (on io and extras) -> engine -> calibration -> eval -> cli. A lower package
that imported a higher one would tie, say, the allocators to the evaluation harness; this test names the file.
The top-level ``depthkv`` package (its ``__version__``) may be imported anywhere, inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "depthkv"
BASE = {"io", "extras"}
BOTTOM = BASE | {"models", "scorers", "allocation", "tasks"}
ALLOWED: dict[str, set[str]] = {
    "io": set(),
    "extras": set(),
    "models": BASE,
    "scorers": BASE,
    "allocation": BASE,
    "tasks": BASE,
    "prompts": BASE | {"tasks"},  # the built-in prompt of `depthkv generate`
    "engine": BOTTOM,
    "calibration": BOTTOM | {"engine"},
    "eval": BOTTOM | {"engine", "calibration"},
    "interop": BOTTOM | {"engine"},  # the kvpress adapter
    "cli": BOTTOM | {"engine", "calibration", "eval", "interop", "prompts"},
    "__main__": {"cli"},
    "__init__": BOTTOM | {"engine"},
}


def _unit(path: Path) -> str:
    """The package (or top-level module) a source file belongs to: depthkv/engine/x.py -> engine."""
    rel = path.relative_to(PACKAGE).parts
    return rel[0] if len(rel) > 1 else rel[0].removesuffix(".py")


def depthkv_imports(path: Path) -> set[str]:
    """The depthkv packages a file imports (absolute imports; ``depthkv`` alone is the top level)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "depthkv" and len(parts) > 1:
                found.add(parts[1])
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_unit_has_a_rule():
    assert {_unit(p) for p in SOURCES} <= set(ALLOWED)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_only_packages_below(path):
    unit = _unit(path)
    above = depthkv_imports(path) - {unit} - ALLOWED[unit]
    assert not above, f"{path.relative_to(PACKAGE.parent)} ({unit}) imports {sorted(above)}, which sit above it"


def test_the_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from depthkv.eval.runner import run_eval\n    import depthkv.cli\n")
    assert depthkv_imports(bad) == {"eval", "cli"}
