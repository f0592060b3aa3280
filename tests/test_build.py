"""The build and install paths a new user takes (issues 13 and 20): the folder -> vivace.*
mapping declared once in pyproject.toml, the version defined once, CMake's explicit source
lists, the project venv made from an externally managed system Python, and editable and
non-editable installs of a clean clone."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
SYSTEM_PYTHON = Path("/usr/bin/python3")


def test_every_package_folder_is_declared():
    """Every folder below a mapped top-level folder that holds modules or data/ is listed."""
    found = {"vivace"}
    for name, folder in SETUPTOOLS["package-dir"].items():
        base = ROOT / folder
        folders = {init.parent for init in base.rglob("__init__.py")} | {d for d in base.rglob("data") if d.is_dir()}
        found |= {".".join([name, *f.relative_to(base).parts]) for f in folders if "__pycache__" not in f.parts}
    assert sorted(SETUPTOOLS["packages"]) == sorted(found)


def test_version_is_defined_once():
    import importlib.metadata

    import vivace

    assert importlib.metadata.version("vivace") == vivace.__version__
    assert SETUPTOOLS["dynamic"]["version"] == {"attr": "vivace.__version__"}
    assert "version" not in (ROOT / "setup.py").read_text().split("\nsetup(", 1)[1]


def test_cmake_lists_every_native_source():
    """Sources are listed, not globbed; no always-on switches; no CUDA without .cu files."""
    cmake = "\n".join(p.read_text() for p in [ROOT / "CMakeLists.txt", *ROOT.glob("csrc/*/*.cmake")])
    assert "GLOB" not in cmake and "VIVACE_WITH_" not in cmake
    listed = {f"csrc/{m}" for m in re.findall(r"csrc/([\w/]+\.(?:cpp|c))\b", cmake)}
    listed |= {f"csrc/{d}/{m}" for d, text in ((p.parent.name, p.read_text()) for p in ROOT.glob("csrc/*/*.cmake"))
               for m in re.findall(r"\$\{CMAKE_CURRENT_LIST_DIR\}/([\w/]+\.(?:cpp|c))\b", text)}
    listed |= {f"csrc/{s}/{s}_bindings.cpp" for s in re.search(r"foreach\(subsystem ([\w ]+)\)", cmake)[1].split()}
    sources = {p.relative_to(ROOT).as_posix() for p in ROOT.glob("csrc/*/*.cpp") if p.parent.name not in ("fuzz", "tests")}
    sources |= {p.relative_to(ROOT).as_posix() for p in ROOT.glob("csrc/*.cpp")}
    assert sources <= listed, sorted(sources - listed)
    if not list(ROOT.glob("csrc/**/*.cu")):
        assert "enable_language(CUDA" not in cmake and "check_language(CUDA" not in cmake


def test_the_featcache_builds_lmdb_from_the_vendored_sources():
    cmake = (ROOT / "csrc" / "featcache" / "featcache.cmake").read_text()
    assert "find_library" not in cmake and "third_party/lmdb/mdb.c" in cmake
    assert "liblmdb" not in (ROOT / ".ci" / "setup").read_text().split("APT_PACKAGES=", 1)[1].split("\n", 1)[0]
    assert (ROOT / "csrc" / "third_party" / "lmdb" / "LICENSE").read_text().startswith("The OpenLDAP Public License")


def externally_managed(python: Path) -> bool:
    stdlib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('stdlib'))"],
                            capture_output=True, text=True, check=True).stdout.strip()
    return Path(stdlib, "EXTERNALLY-MANAGED").exists()


@pytest.mark.skipif(not SYSTEM_PYTHON.exists(), reason="no system python3")
def test_setup_makes_a_venv_from_an_externally_managed_python(tmp_path):
    """`.ci/setup` never pip-installs into the system interpreter: it makes the project venv
    from it (the step that failed with externally-managed-environment on stock Debian)."""
    if not externally_managed(SYSTEM_PYTHON):
        pytest.skip("the system python3 is not externally managed here")
    venv = tmp_path / "venv"
    proc = subprocess.run(["bash", str(ROOT / ".ci" / "setup"), "venv"], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, PYTHON=str(SYSTEM_PYTHON), VENV=str(venv)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f". {venv}/bin/activate" in proc.stdout
    python = venv / "bin" / "python"
    inside = subprocess.run([str(python), "-c", "import sys; print(sys.prefix != sys.base_prefix)"],
                            capture_output=True, text=True, check=True)
    assert inside.stdout.strip() == "True"
    # The venv takes pip installs; the system interpreter refuses them.
    takes = subprocess.run([str(python), "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index", "pip"],
                           capture_output=True, text=True)
    assert takes.returncode == 0, takes.stderr
    refused = subprocess.run([str(SYSTEM_PYTHON), "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index", "pip"],
                             capture_output=True, text=True)
    assert "externally-managed-environment" in refused.stderr


def throwaway_venv(path: Path) -> tuple[Path, Path]:
    """A venv without pip that sees this interpreter's installed dependencies (through a
    .pth, so their .pth hooks, such as this checkout's editable finder, stay off)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    ours = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]
    Path(purelib, "deps.pth").write_text("\n".join(ours) + "\n")
    return python, Path(purelib)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_editable_and_regular_installs_of_a_clean_clone(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    # One CMake build directory for both installs: the second reuses the first's objects.
    env = dict(os.environ, VIVACE_BUILD_DIR=str(tmp_path / "cmake"), PIP_DISABLE_PIP_VERSION_CHECK="1")
    # registry/data/ sits next to registry/data.py (which `vivace.registry.data` imports):
    # the data files are checked by path.
    probe = ("import pathlib, vivace, vivace._core, vivace.engine.native, vivace.bench.baselines, vivace.registry,"
             " vivace.monitor, vivace.bench;"
             "print(vivace.__file__); print(vivace._core.__file__);"
             "here = lambda m, f: (pathlib.Path(m.__file__).parent / f).is_file();"
             "assert here(vivace, '_core.pyi') and here(vivace, 'py.typed');"
             "import platform; assert platform.machine() != 'x86_64' or any("
             "pathlib.Path(vivace.__file__).parent.glob('_cpu_emulation*.so'));"
             "assert here(vivace.registry, 'data/churn_train.yaml') and here(vivace.monitor, 'data/prometheus.yml');"
             "assert here(vivace.bench, 'data/infer_mlp.lua')")
    for mode in ([], ["-e"]):
        python, purelib = throwaway_venv(tmp_path / ("venv-editable" if mode else "venv"))
        install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                                  "--no-build-isolation", *mode, str(clone)],
                                 capture_output=True, text=True, timeout=1200, env=env)
        assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
        proc = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert proc.returncode == 0, proc.stderr
        package, core = proc.stdout.split()
        where = clone if mode else purelib
        assert Path(package).is_relative_to(where) and Path(core).is_relative_to(where), proc.stdout
        cli = subprocess.run([str(python.parent / "vivace"), "--help"], capture_output=True, text=True,
                             cwd=tmp_path, timeout=120)
        assert cli.returncode == 0 and "serve" in cli.stdout, cli.stderr
