"""CI gates, run with the suite: ruff, mypy on the typed modules, mypy's stubtest of
vivace._core against vivace/_core.pyi, and the import-linter contracts of pyproject.toml (the layering)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[test]')")
    return str(path)


def run(*args: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def test_ruff():
    proc = run(tool("ruff"), "check", "--no-cache", "--output-format", "concise", ".")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_stubtest_of_the_compiled_core():
    proc = run(sys.executable, "-m", "mypy.stubtest", "vivace._core", "--concise",
               "--allowlist", str(ROOT / "tests" / "stubtest_allowlist.txt"))
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


def installed_layout(dest: Path) -> Path:
    """The vivace package as installed (folders mapped per [tool.setuptools] package-dir):
    the editable install maps them with an import hook, which import-linter does not see."""
    for package, folder in PYPROJECT["tool"]["setuptools"]["package-dir"].items():
        shutil.copytree(ROOT / folder, dest.joinpath(*package.split(".")), dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.so", "data", "*.md"))
    return dest


def floor_modules() -> set[str]:
    """The modules of vivace/ other than the command shell: the shared-format floor."""
    return {f"vivace.{p.stem}" for p in (ROOT / "vivace").glob("*.py")} - {"vivace.__init__", "vivace.__main__",
                                                                           "vivace.cli"}


# Typed by design: the shared formats and the entry points others build on. mypy checks
# them as written (imports of the rest followed silently, not checked).
TYPED_MODULES = ["vivace/datatypes.py", "vivace/spec.py", "vivace/profile.py", "vivace/errors.py",
                 "engine/routes.py", "engine/options.py", "registry/packaging.py",
                 "engine/deploy.py", "registry/remote.py", "registry/pipeline.py"]


def test_mypy_on_the_floor_and_public_entry_points():
    proc = run(sys.executable, "-m", "mypy", "--no-incremental", "--ignore-missing-imports",
               "--follow-imports=silent", *TYPED_MODULES)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


def test_every_floor_module_is_under_the_floor_contracts():
    contracts = {c["name"]: c for c in PYPROJECT["tool"]["importlinter"]["contracts"]}
    for name in ("The shared-format floor imports nothing of ours", "Only the command shell imports the benchmark harness"):
        missing = floor_modules() - set(contracts[name]["source_modules"])
        assert not missing, f"add {sorted(missing)} to the source_modules of {name!r} in pyproject.toml"


def test_import_contracts(tmp_path):
    lint_imports = tool("lint-imports")
    layout = installed_layout(tmp_path / "src")
    env = dict(os.environ, PYTHONPATH=str(layout))
    proc = run(lint_imports, "--config", str(ROOT / "pyproject.toml"), "--no-cache", cwd=layout, env=env)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
