"""`vivace bench drift`: the Evidently peer is required unless explicitly skipped (issue 21 item 4)."""
from __future__ import annotations

import argparse
import sys

import pytest

from vivace.bench import drift


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    drift.register(parser.add_subparsers())
    return parser.parse_args(["drift", "--rows", "2000", "--repeat", "1", "--batch-sizes", "64", *argv])


def test_a_missing_peer_fails_loudly(capsys):
    assert drift._run(_args()) == 2
    assert "--evidently-python" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="cannot run Evidently with /nonexistent/python"):
        drift._run(_args("--evidently-python", "/nonexistent/python"))
    # An interpreter without evidently is a failure too, not a silent skip.
    with pytest.raises(SystemExit, match="Evidently failed under"):
        drift._run(_args("--evidently-python", sys.executable if not _has_evidently() else "/bin/false"))


def test_skipping_the_peer_is_explicit_and_the_cpu_is_printed(capsys):
    assert drift._run(_args("--skip-evidently")) == 0
    out = capsys.readouterr().out
    assert out.startswith("CPU: ") and "ISA level" in out
    assert "skipped (--skip-evidently)" in out


def _has_evidently() -> bool:
    import importlib.util

    return importlib.util.find_spec("evidently") is not None
