"""Build the native core (csrc/) with CMake and install the Python packages under `vivace.*`.

The repository keeps one folder per idea (engine/, registry/, ...); they are installed as
subpackages of the `vivace` namespace. The folder vivace/ is only the package root;
the compiled core lands there as `vivace/_core*.so`.

Environment switches (read at build time):
  VIVACE_BUILD_TYPE   Release (default), Debug, RelWithDebInfo
  VIVACE_SANITIZE     "address,undefined" or "thread": sanitizer build of the core
  VIVACE_CUDA         "0" disables the CUDA parts even when nvcc is found
  CMAKE_ARGS          extra arguments for the CMake configure step
  MAX_JOBS            parallel build jobs (default: CPU count)
  CMAKE_C_COMPILER_LAUNCHER / CCACHE: a compiler launcher such as ccache
"""
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
SUBPACKAGES = ["engine", "registry", "features", "monitor", "bench"]
VERSION = "0.1.0"


def _find_packages():
    """Map every package folder below the top-level idea folders to vivace.<folder>."""
    packages, package_dir = ["vivace"], {"vivace": "vivace"}
    for top in SUBPACKAGES:
        folders = {init.parent for init in (ROOT / top).rglob("__init__.py")}
        # data/ folders hold package data (configs, scripts), installed as data packages.
        folders |= {d for d in (ROOT / top).rglob("data") if d.is_dir() and "__pycache__" not in d.parts}
        for folder in sorted(folders):
            rel = folder.relative_to(ROOT)
            name = "vivace." + ".".join(rel.parts)
            packages.append(name)
            package_dir[name] = rel.as_posix()
    return packages, package_dir


class CMakeExtension(Extension):
    def __init__(self, name: str, target: str):
        super().__init__(name, sources=[])
        self.target = target


class CMakeBuild(build_ext):
    """Configure CMake once, build each extension target, copy it where setuptools wants it."""

    def run(self):
        if shutil.which("cmake") is None:
            raise RuntimeError("cmake is required to build vivace's native core")
        build_type = os.environ.get("VIVACE_BUILD_TYPE", "Release")
        build_dir = Path(self.build_temp).resolve() / f"cmake-{build_type}"
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DVIVACE_SANITIZE={os.environ.get('VIVACE_SANITIZE', '')}",
            f"-DVIVACE_CUDA={'OFF' if os.environ.get('VIVACE_CUDA') == '0' else 'AUTO'}",
        ]
        try:
            import pybind11

            args.append(f"-Dpybind11_DIR={pybind11.get_cmake_dir()}")
        except ImportError:
            pass
        if shutil.which("ninja"):
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


packages, package_dir = _find_packages()

setup(
    version=VERSION,
    packages=packages,
    package_dir=package_dir,
    package_data={name: ["*.pyi", "py.typed", "*.json", "*.yaml", "*.yml", "*.lua", "*.html", "*.csv"] for name in packages},
    ext_modules=[CMakeExtension("vivace._core", target="_core")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
