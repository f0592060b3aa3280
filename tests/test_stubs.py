"""vivace/_core.pyi describes the compiled core: the same public names, no more, no less."""
from __future__ import annotations

import ast
from pathlib import Path

from vivace import _core

STUB = Path(__file__).resolve().parent.parent / "vivace" / "_core.pyi"


def stub_names() -> set[str]:
    names = set()
    for node in ast.parse(STUB.read_text()).body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if not n.startswith("_")}


def test_stub_matches_the_compiled_module():
    public = {n for n in dir(_core) if not n.startswith("_")}
    assert stub_names() == public


def test_package_is_typed():
    assert (STUB.parent / "py.typed").is_file()
