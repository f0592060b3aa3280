"""The `vivace` command: every subcommand is routed to the module that defines it, and a
command loads only its own module (fresh-process start-up time)."""
from __future__ import annotations

import subprocess
import sys

from vivace.cli import COMMANDS, _command_in, build_parser


def test_every_registered_command_is_routed():
    parser = build_parser()
    registered = set(parser._subparsers._group_actions[0].choices)  # noqa: SLF001 - argparse has no public API
    assert registered == set(COMMANDS)


def test_command_detection_skips_global_options():
    assert _command_in(["--home", "/x", "score", "pkg"]) == "score"
    assert _command_in(["--help"]) is None


def test_score_does_not_import_the_other_modules(mlp_package, tmp_path):
    import numpy as np

    np.save(tmp_path / "x.npy", np.zeros((1, 32), np.float32))
    code = (
        "import sys; from vivace.cli import main; "
        f"rc = main(['score', {str(mlp_package)!r}, '--input', {str(tmp_path / 'x.npy')!r}, "
        f"'--output', {str(tmp_path / 'y.npy')!r}]); "
        "print(rc, sorted(m for m in ('pandas', 'vivace.registry.store', 'vivace.features.store', "
        "'vivace.engine.http') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "0 []", out.stdout + out.stderr
