"""The architecture holds: modules a reader can hold in mind, argparse in one place, every
package shipped. These are the rules of issue 9, checked so they do not erode again."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "offscan"
MAX_MODULE_LINES = 650  # "about 600": split a module along its banners when it passes this
MAX_FUNCTION_LINES = 80  # unless the docstring says why it is long
MODULES = sorted(PACKAGE.rglob("*.py"))


def _rel(path: Path) -> str:
    return str(path.relative_to(PACKAGE.parent))


@pytest.mark.parametrize("path", MODULES, ids=_rel)
def test_module_size(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{_rel(path)} has {lines} lines; split it by concern"


@pytest.mark.parametrize("path", MODULES, ids=_rel)
def test_function_size(path: Path) -> None:
    tree = ast.parse(path.read_text())
    long = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            size = (node.end_lineno or node.lineno) - node.lineno + 1
            doc = ast.get_docstring(node) or ""
            if size > MAX_FUNCTION_LINES and "long" not in doc.lower():
                long.append(f"{node.name} ({size} lines)")
    assert not long, f"{_rel(path)}: {', '.join(long)} without a reason in the docstring"


@pytest.mark.parametrize(
    "path", [p for p in MODULES if "cli" not in p.relative_to(PACKAGE).parts[:1]], ids=_rel
)
def test_argparse_only_in_cli(path: Path) -> None:
    tree = ast.parse(path.read_text())
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "argparse" not in imported, f"{_rel(path)} imports argparse: it belongs in offscan/cli/"


def test_every_package_is_shipped() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    found = {
        "offscan." + ".".join(p.parent.relative_to(PACKAGE).parts)
        if p.parent != PACKAGE
        else "offscan"
        for p in PACKAGE.rglob("__init__.py")
    }
    assert found <= listed, (
        f"not in pyproject's packages (pip install . would drop them): {found - listed}"
    )
