"""Coverage-guided fuzzing, bounded: every target of tests/fuzz/run_fuzz.py runs for a few
seconds from its committed seeds and must find nothing; the inputs of past findings are
replayed; and each finding has a regression test here.

VIVACE_FUZZ_SECONDS sets the time per target (default 5); the libFuzzer targets are
skipped when clang++ is missing (Debian: apt-get install clang).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

from vivace.engine import oip

FUZZ = Path(__file__).resolve().parent / "fuzz"
SECONDS = int(os.environ.get("VIVACE_FUZZ_SECONDS", "5"))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"vivace_fuzz_{name}", FUZZ / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


run_fuzz = _load("run_fuzz")
targets = _load("targets")


@pytest.fixture(scope="module")
def native_build(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz-build")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("target", run_fuzz.TARGETS)
def test_fuzz_target_finds_nothing(target, tmp_path, native_build):
    if target in run_fuzz.NATIVE_TARGETS and shutil.which("clang++") is None:
        pytest.skip("clang++ not installed (apt-get install clang)")
    if target in run_fuzz.PYTHON_TARGETS and importlib.util.find_spec("atheris") is None:
        pytest.skip("atheris not installed (pip install atheris)")
    result = run_fuzz.run_target(target, SECONDS, tmp_path, build_dir=native_build)
    assert not result.skipped, result.skipped
    assert result.ok, f"{run_fuzz.report([result])}\n{result.log_tail}"
    assert result.executions > 0 and result.coverage > 0, result.log_tail


@pytest.fixture(scope="module")
def target_objects():
    made = {}

    def get(name: str):
        if name not in made:
            made[name] = targets.TARGETS[name]()
            made[name].setup()
        return made[name]

    return get


REGRESSIONS = sorted(p for p in (FUZZ / "regressions").glob("*/*") if p.is_file())


@pytest.mark.parametrize("path", REGRESSIONS, ids=[f"{p.parent.name}/{p.name}" for p in REGRESSIONS])
def test_past_findings_replay_cleanly(path, target_objects):
    """Inputs that once failed a target replay through it (known findings tolerated)."""
    target_objects(path.parent.name).check(path.read_bytes())


def test_seed_corpus_is_committed_for_every_target():
    for target in run_fuzz.TARGETS:
        seeds = list((FUZZ / "corpus" / target).iterdir())
        assert 3 <= len(seeds) <= 64, f"{target}: {len(seeds)} seeds"


# -- findings not fixed yet (see targets.KNOWN_FINDINGS) -----------------------------------

def _native_json_target():
    target = targets.NativeJsonTarget()
    target.setup()
    return target


def test_invalid_utf8_body_is_a_protocol_error():
    decoder = oip.InferDecoder(targets.OipDecoderTarget.package)
    with pytest.raises(oip.ProtocolError):
        decoder.decode(b'{"id":"\xff","inputs":[]}', None)


def test_deeply_nested_body_is_a_protocol_error():
    decoder = oip.InferDecoder(targets.OipDecoderTarget.package)
    with pytest.raises(oip.ProtocolError):
        decoder.decode((FUZZ / "regressions" / "oip_decoder" / "deep_nesting").read_bytes()[1:], None)


def test_fast_path_declines_invalid_utf8():
    target = _native_json_target()
    body = (FUZZ / "regressions" / "native_json" / "invalid_utf8_id").read_bytes()
    assert target.fast.submit_json(1, body) == targets.JSON_DECLINED


def test_declared_rows_are_bounded_by_the_body():
    """Finding "unbounded-rows" (fixed): the buffer was sized from the declared rows before the
    data was checked, so a 100-byte body declaring 10^9 rows made the server allocate gigabytes."""
    target = _native_json_target()
    for rows in (1 << 22, 1 << 40):  # 92 MB, which an allocator grants; 24 TB, which it refuses
        body = (b'{"inputs":[{"name":"x","shape":[%d,3],"datatype":"FP32","data":[1,2,3]},'
                b'{"name":"k","shape":[%d,1],"datatype":"INT64","data":[1]},'
                b'{"name":"b","shape":[%d,2],"datatype":"BOOL","data":[true,false]}]}' % (rows, rows, rows))
        assert target.fast.submit_json(1, body) == targets.JSON_DECLINED
        with pytest.raises(ValueError, match="elements"):
            target.general.submit(2, [[1.0, 2.0, 3.0], [1], [True, False]], rows)
