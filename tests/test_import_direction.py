"""The import direction of the design: console -> ingest <- workers; the SDK imports nothing from the server."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "ingest": {"workers", "console"},
    "console": {"workers"},
    "workers": {"console"},
    "sdk": {"appliance", "ingest", "console", "workers"},
}


def _imports(package: str):
    for path in sorted((ROOT / package).rglob("*.py")):
        if any(part in {".venv", "node_modules", "build"} for part in path.parts):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield path, node.lineno, alias.name
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                yield path, node.lineno, node.module


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_against_the_direction(package):
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {module}" for path, line, module in _imports(package)
             if module.split(".")[0] in FORBIDDEN[package]]
    assert not wrong, "\n".join(wrong)
