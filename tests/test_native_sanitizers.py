"""Builds the native core with ASan/UBSan and with TSan and runs its C++ stress tests.

Each build configures CMake in a temporary folder (VIVACE_BUILD_TESTS=ON) and runs every
test program it produces; a sanitizer report fails the test. Needs cmake and a compiler,
which building the package needs anyway.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEST_PROGRAMS = ["batcher_test", "kernels_test", "frontend_test", "http_parse_test", "featcache_test"]


@pytest.mark.sanitizer
@pytest.mark.timeout(900)
@pytest.mark.parametrize("sanitizer", ["address,undefined", "thread"])
def test_core_under_sanitizer(sanitizer, tmp_path):
    if shutil.which("cmake") is None:
        pytest.skip("cmake not installed")
    import pybind11

    args = ["cmake", "-S", str(ROOT), "-B", str(tmp_path), "-DCMAKE_BUILD_TYPE=Debug",
            "-DVIVACE_BUILD_TESTS=ON", f"-DVIVACE_SANITIZE={sanitizer}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}"]
    if shutil.which("ninja"):
        args += ["-G", "Ninja"]
    subprocess.run(args, check=True, capture_output=True)
    build = subprocess.run(["cmake", "--build", str(tmp_path), "--parallel", str(os.cpu_count() or 1),
                            "--target", *TEST_PROGRAMS], capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    env = dict(os.environ, ASAN_OPTIONS="halt_on_error=1:detect_leaks=1", UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1",
               TSAN_OPTIONS="halt_on_error=1")
    for program in TEST_PROGRAMS:
        run = subprocess.run([str(tmp_path / program)], capture_output=True, text=True, env=env, timeout=600)
        assert run.returncode == 0, f"{program} under {sanitizer}:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
        assert "all checks passed" in run.stdout
