"""Runs one Python fuzz target under atheris (libFuzzer for Python).

    python tests/fuzz/fuzz_target.py TARGET [libFuzzer options] [corpus dirs]

TARGET is one of targets.TARGETS. Vivace's Python modules are instrumented for coverage;
the native core is not (csrc/fuzz/ fuzzes it with libFuzzer directly). A finding stops
the run, prints its traceback and writes the input as crash-<sha1> (see -artifact_prefix).
Usually started by run_fuzz.py.
"""
from __future__ import annotations

import sys

import atheris

INSTRUMENTED = ["vivace.engine", "vivace.registry.package"]

with atheris.instrument_imports(include=INSTRUMENTED):
    import targets


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in targets.TARGETS:
        sys.exit(f"usage: fuzz_target.py {{{'|'.join(targets.TARGETS)}}} [libFuzzer options]")
    target = targets.TARGETS[sys.argv[1]]()
    with atheris.instrument_imports(include=INSTRUMENTED):  # setup imports the HTTP stack
        target.setup()
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target.check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
