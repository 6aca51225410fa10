"""The suite's own rule: shared builders live in tests/factories.py, so no test module imports
another test module or a conftest (a builder there would be shared by accident, and a renamed
test file would break its importers)."""

import ast
from pathlib import Path

TESTS = Path(__file__).parent


def _imported(tree: ast.AST):
    """Every module an ``import`` or ``from ... import`` names, relative ones with their leading dots."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield "." * node.level + (node.module or "")


def test_tests_import_builders_from_factories_only():
    found = [f"{path.relative_to(TESTS)}: {name}" for path in sorted(TESTS.rglob("*.py"))
             for name in _imported(ast.parse(path.read_text()))
             if name.startswith(("tests.", ".")) and name != "tests.factories"]
    assert found == []
