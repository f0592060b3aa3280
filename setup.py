"""Build the native core (csrc/) with CMake into `vivace/_core*.so`.

Everything else (metadata, the folder -> `vivace.*` package mapping, package data, the
version) is declared in pyproject.toml; this file only adds the CMake extension build.

The CMake build directory persists in the checkout, build/cmake-<type>[-<sanitizers>]-<python>,
so a second `pip install -e .` (or `make test`) recompiles only what changed.

Environment switches (read at build time):
  VIVACE_BUILD_TYPE   Release (default), Debug, RelWithDebInfo
  VIVACE_SANITIZE     "address,undefined" or "thread": sanitizer build of the core
  VIVACE_BUILD_DIR    the CMake build directory, instead of the one under build/
  CMAKE_ARGS          extra arguments for the CMake configure step
  MAX_JOBS            parallel build jobs (default: CPU count)
  CMAKE_C_COMPILER_LAUNCHER / CCACHE: a compiler launcher such as ccache
"""
import os
import platform
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, target: str):
        super().__init__(name, sources=[])
        self.target = target


def build_directory(build_type: str, sanitize: str) -> Path:
    """One directory per configuration, so switching (e.g. a sanitizer build) never
    invalidates another's objects."""
    if os.environ.get("VIVACE_BUILD_DIR"):
        return Path(os.environ["VIVACE_BUILD_DIR"]).resolve()
    parts = [build_type] + ([sanitize.replace(",", "+")] if sanitize else []) + [sys.implementation.cache_tag]
    return ROOT / "build" / ("cmake-" + "-".join(parts))


class CMakeBuild(build_ext):
    """Configure CMake, build each extension target, copy it where setuptools wants it."""

    def run(self):
        if shutil.which("cmake") is None:
            raise RuntimeError("cmake is required to build vivace's native core")
        build_type = os.environ.get("VIVACE_BUILD_TYPE", "Release")
        sanitize = os.environ.get("VIVACE_SANITIZE", "")
        build_dir = build_directory(build_type, sanitize)
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DVIVACE_SANITIZE={sanitize}",
        ]
        try:
            import pybind11

            args.append(f"-Dpybind11_DIR={pybind11.get_cmake_dir()}")
        except ImportError:
            pass
        # The generator is fixed when a build directory is first configured.
        if shutil.which("ninja") and not (build_dir / "CMakeCache.txt").exists():
            args += ["-G", "Ninja"]
        launcher = os.environ.get("CMAKE_C_COMPILER_LAUNCHER") or (
            "ccache" if os.environ.get("CCACHE") and shutil.which("ccache") else None
        )
        if launcher:
            args += [f"-DCMAKE_C_COMPILER_LAUNCHER={launcher}", f"-DCMAKE_CXX_COMPILER_LAUNCHER={launcher}"]
        args += shlex.split(os.environ.get("CMAKE_ARGS", ""))
        subprocess.check_call(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args])
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        for ext in self.extensions:
            subprocess.check_call(
                ["cmake", "--build", str(build_dir), "--target", ext.target, "--parallel", jobs]
            )
            built = next(build_dir.glob(f"{ext.target}*.so"))
            dest = Path(self.get_ext_fullpath(ext.name))
            dest.parent.mkdir(parents=True, exist_ok=True)
            # Copy then rename: a process that has the old library mapped keeps its inode
            # instead of crashing on a file rewritten under it (editable installs).
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}")
            shutil.copyfile(built, tmp)
            os.replace(tmp, dest)


extensions = [CMakeExtension("vivace._core", target="_core")]
if sys.platform == "linux" and platform.machine() in ("x86_64", "AMD64"):
    # Not a Python module: the LD_PRELOAD library of `vivace bench kernels --emulate-cpu`.
    extensions.append(CMakeExtension("vivace._cpu_emulation", target="_cpu_emulation"))

setup(
    ext_modules=extensions,
    cmdclass={"build_ext": CMakeBuild},
)
