"""`vivace bench kernels --emulate-cpu avx2`: the `_cpu_emulation` library hides AVX-512,
VNNI and AMX from every runtime in a process (CPUID trapped), refuses loudly where it
cannot, and leaves real crashes alone."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import vivace
from vivace import _core

LIBRARY = next(Path(vivace.__file__).parent.glob("_cpu_emulation*.so"), None)
pytestmark = pytest.mark.skipif(LIBRARY is None, reason="the CPU emulation library is built on x86-64 Linux only")


def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        return set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())


CAN_TRAP_CPUID = LIBRARY is not None and "cpuid_fault" in cpu_flags()


def run_emulated(code: str, target: str = "avx2", *options: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, LD_PRELOAD=str(LIBRARY), VIVACE_EMULATE_CPU=target)
    return subprocess.run([sys.executable, *options, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)


PROBE = ("import numpy, torch; from vivace import _core;"
         "f = getattr(numpy, '_core', getattr(numpy, 'core', None))._multiarray_umath.__cpu_features__;"
         "print(_core.cpu_levels()[-1], torch.backends.cpu.get_cpu_capability(), f['AVX512F'], f['AVX2'])")


@pytest.mark.skipif(not CAN_TRAP_CPUID, reason="this machine cannot trap CPUID")
def test_every_runtime_sees_an_avx2_cpu():
    proc = run_emulated(PROBE)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["avx2", "AVX2", "False", "True"]
    # Threads and forked children inherit the trap: their CPUID is masked too.
    proc = run_emulated("import os, threading; from vivace import _core;"
                        "t = threading.Thread(target=lambda: print(_core.cpu_levels()[-1])); t.start(); t.join();"
                        "pid = os.fork();\n"
                        "if pid == 0: print(_core.cpu_levels()[-1], flush=True); os._exit(0)\n"
                        "os.waitpid(pid, 0)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["avx2", "avx2"]


@pytest.mark.skipif(not CAN_TRAP_CPUID, reason="this machine cannot trap CPUID")
def test_a_real_segfault_still_crashes():
    proc = run_emulated("import ctypes; ctypes.string_at(0)")
    assert proc.returncode == -signal.SIGSEGV
    # A SIGSEGV sent by a process is not a trapped CPUID either.
    proc = run_emulated("import os, signal; os.kill(os.getpid(), signal.SIGSEGV); print('survived')")
    assert proc.returncode == -signal.SIGSEGV and "survived" not in proc.stdout


@pytest.mark.skipif(not CAN_TRAP_CPUID, reason="this machine cannot trap CPUID")
def test_the_programs_own_segfault_handlers_keep_working():
    # Python's faulthandler (pytest turns it on) installs its own SIGSEGV handler: CPUID must
    # still be answered, and a real fault must still reach faulthandler.
    proc = run_emulated(PROBE, "avx2", "-X", "faulthandler")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["avx2", "AVX2", "False", "True"]
    proc = run_emulated("import ctypes; ctypes.string_at(0)", "avx2", "-X", "faulthandler")
    assert proc.returncode == -signal.SIGSEGV and "Fatal Python error: Segmentation fault" in proc.stderr
    # A Python-level handler gets the signals meant for it; CPUIDs run after it (the
    # imports') are still answered.
    proc = run_emulated("import os, signal; got = [];"
                        "signal.signal(signal.SIGSEGV, lambda *a: got.append(a[0]));"
                        "print(signal.getsignal(signal.SIGSEGV) is not signal.SIG_DFL);"
                        "os.kill(os.getpid(), signal.SIGSEGV);\n" + PROBE + "; print(got)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:3] == ["True", "avx2 AVX2 False True", f"[{int(signal.SIGSEGV)}]"]


@pytest.mark.skipif(CAN_TRAP_CPUID, reason="this machine can trap CPUID")
def test_a_machine_that_cannot_trap_cpuid_is_refused():
    proc = run_emulated("print('ran unmasked')")
    assert proc.returncode == 2 and "ran unmasked" not in proc.stdout
    assert "cannot trap the CPUID instruction" in proc.stderr


def test_unknown_target_and_absent_switch():
    proc = run_emulated("print('ran')", target="avx3")
    assert proc.returncode == 2 and "unknown target (expected avx2)" in proc.stderr
    # Preloaded without VIVACE_EMULATE_CPU: nothing changes.
    env = {k: v for k, v in os.environ.items() if k != "VIVACE_EMULATE_CPU"}
    proc = subprocess.run([sys.executable, "-c", "from vivace import _core; print(_core.cpu_levels()[-1])"],
                          env=dict(env, LD_PRELOAD=str(LIBRARY)), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.split() == [_core.cpu_levels()[-1]]


@pytest.mark.skipif(not CAN_TRAP_CPUID, reason="this machine cannot trap CPUID")
def test_kernels_benchmark_under_emulation():
    pytest.importorskip("onnxruntime")
    proc = subprocess.run([sys.executable, "-m", "vivace", "bench", "kernels", "--emulate-cpu", "avx2",
                           "--models", "reference", "--batches", "1,8", "--threads", "1", "--repeat", "1",
                           "--seconds", "0.005"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    header = proc.stdout.splitlines()[0]
    assert "ISA level avx2 (of portable, avx2)" in header and "emulating an avx2 CPU" in header
    assert "vivace/peer" in proc.stdout and "max abs error" in proc.stdout
    assert "int8 peak of one core at the avx2 level" in proc.stdout
