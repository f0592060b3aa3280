"""Runs the fuzz targets for a bounded time each and reports executions, coverage and crashes.

    python tests/fuzz/run_fuzz.py --seconds 60 --target all
    python tests/fuzz/run_fuzz.py --seconds 10 --target http --workdir /tmp/fuzz

Targets: the Python ones of targets.py under atheris (oip_decoder, native_json, http,
featcache) and the libFuzzer harnesses of csrc/fuzz/ (oip_json, sketch, http_parse; built with clang,
skipped when clang++ is missing). Each starts from the committed seeds tests/fuzz/corpus/<target>/ and
the inputs of past findings tests/fuzz/regressions/<target>/ (both read-only: new inputs
go to the work folder). A crash's input is kept in <workdir>/crashes/<target>/; replay it
with `python tests/fuzz/fuzz_target.py TARGET FILE` or `<build>/fuzz_TARGET FILE`.
Exit status 1 when any target crashed or failed to run.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CORPUS = HERE / "corpus"
REGRESSIONS = HERE / "regressions"  # inputs of past findings: replayed by tests/test_fuzz.py, seeds too
DICTIONARY = HERE / "oip.dict"
PYTHON_TARGETS = ("oip_decoder", "native_json", "http", "featcache")
NATIVE_TARGETS = ("oip_json", "sketch", "http_parse")
TARGETS = PYTHON_TARGETS + NATIVE_TARGETS
SETUP_SECONDS = 120  # process start, imports, the http target's torch model; beyond --seconds

_STATUS_LINE = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+)", re.MULTILINE)
_EXECUTED = re.compile(r"stat::number_of_executed_units: (\d+)")


@dataclass
class FuzzResult:
    target: str
    seconds: float
    executions: int = 0
    coverage: int = 0  # libFuzzer "cov": edges (native) or Python branch counters (atheris)
    features: int = 0  # libFuzzer "ft"
    new_inputs: int = 0
    crashes: list[Path] = field(default_factory=list)
    skipped: str = ""
    error: str = ""  # the run failed without leaving a crash input (setup error, timeout)
    log_tail: str = ""

    @property
    def ok(self) -> bool:
        return not self.crashes and not self.error


def build_native(build_dir: Path) -> str:
    """Builds the libFuzzer harnesses; returns why they cannot be run, or "" when built."""
    if shutil.which("clang++") is None:
        return "clang++ not found (apt-get install clang)"
    make = subprocess.run(["make", "-C", str(ROOT / "csrc" / "fuzz"), f"BUILD={build_dir}"],
                          capture_output=True, text=True)
    if make.returncode != 0:
        return f"build failed:\n{make.stdout[-2000:]}{make.stderr[-3000:]}"
    return ""


def run_target(target: str, seconds: int, workdir: Path, build_dir: Path | None = None) -> FuzzResult:
    """Fuzzes one target for `seconds` and parses libFuzzer's report."""
    result = FuzzResult(target, seconds)
    if target in NATIVE_TARGETS:
        build_dir = build_dir or workdir / "build"
        why = build_native(build_dir)
        if why:
            result.skipped = why
            return result
        command = [str(build_dir / f"fuzz_{target}")]
    else:
        command = [sys.executable, str(HERE / "fuzz_target.py"), target]
    corpus = workdir / "corpus" / target
    crashes = workdir / "crashes" / target
    corpus.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(parents=True, exist_ok=True)
    before = set(crashes.iterdir())
    command += [f"-max_total_time={seconds}", "-print_final_stats=1", "-timeout=10", "-rss_limit_mb=3072",
                f"-artifact_prefix={crashes}/", "-max_len=8192"]
    if target not in ("sketch", "featcache"):
        command.append(f"-dict={DICTIONARY}")
    command += [str(corpus), str(CORPUS / target)]  # new inputs land in the first folder only
    if (REGRESSIONS / target).is_dir():
        command.append(str(REGRESSIONS / target))
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:allocator_may_return_null=1",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    try:
        run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=seconds + SETUP_SECONDS)
        log = run.stdout + run.stderr
        returncode = run.returncode
    except subprocess.TimeoutExpired as exc:
        log = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace")
        returncode = None
    result.log_tail = log[-6000:]
    statuses = _STATUS_LINE.findall(log)
    if statuses:
        result.coverage, result.features = int(statuses[-1][1]), int(statuses[-1][2])
    executed = _EXECUTED.findall(log)
    result.executions = int(executed[-1]) if executed else int(statuses[-1][0]) if statuses else 0
    result.new_inputs = len(list(corpus.iterdir()))
    result.crashes = sorted(set(crashes.iterdir()) - before)
    if returncode is None:
        result.error = f"did not finish within {seconds + SETUP_SECONDS} s"
    elif returncode != 0 and not result.crashes:
        result.error = f"exited with status {returncode}"
    return result


def report(results: list[FuzzResult]) -> str:
    lines = [f"{'target':<12} {'seconds':>7} {'executions':>11} {'exec/s':>8} {'cov':>6} {'ft':>6} "
             f"{'new':>5} {'crashes':>7}"]
    for r in results:
        if r.skipped:
            lines.append(f"{r.target:<12} skipped: {r.skipped.splitlines()[0]}")
            continue
        rate = r.executions / r.seconds if r.seconds else 0
        lines.append(f"{r.target:<12} {r.seconds:>7} {r.executions:>11} {rate:>8.0f} {r.coverage:>6} "
                     f"{r.features:>6} {r.new_inputs:>5} {len(r.crashes):>7}")
        for crash in r.crashes:
            lines.append(f"  crash input: {crash}")
        if r.error:
            lines.append(f"  error: {r.error}")
    total = sum(r.executions for r in results)
    crashed = sum(len(r.crashes) for r in results)
    lines.append(f"total: {total} executions, {crashed} crashes")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=60, help="fuzzing time per target (default 60)")
    parser.add_argument("--target", default="all", choices=("all", *TARGETS))
    parser.add_argument("--workdir", type=Path, help="keep new inputs and crashes here (default: a temporary folder)")
    args = parser.parse_args(argv)
    targets = TARGETS if args.target == "all" else (args.target,)
    with tempfile.TemporaryDirectory(prefix="vivace-fuzz-") as tmp:
        workdir = args.workdir or Path(tmp)
        results = []
        for target in targets:
            result = run_target(target, args.seconds, workdir)
            results.append(result)
            if not result.ok:
                print(f"--- {target} log (tail) ---\n{result.log_tail}", file=sys.stderr)
        print(report(results))
        if any(r.crashes for r in results) and args.workdir is None:
            kept = Path(tempfile.mkdtemp(prefix="vivace-fuzz-crashes-"))
            for r in results:
                for crash in r.crashes:
                    shutil.copy(crash, kept / f"{r.target}-{crash.name}")
            print(f"crash inputs copied to {kept}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
