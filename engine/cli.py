"""The `vivace` command: one console script, one subcommand group per module."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# Modules that contribute subcommands: each has `register(subparsers)` adding parsers
# whose `func(args) -> int` runs the command. Imported lazily so that `vivace --help`
# stays fast and a module's heavy imports happen only when its command runs.
COMMAND_MODULES = [
    "vivace.engine.commands",
    "vivace.engine.native.cli",
    "vivace.bench.commands",
    "vivace.registry.cli",
    "vivace.features.cli",
    "vivace.monitor.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vivace", description="Vivace ML serving engine")
    parser.add_argument(
        "--home",
        default=os.environ.get("VIVACE_HOME", "./.vivace"),
        help="Vivace home: SQLite metadata, artifacts, online store (default: $VIVACE_HOME or ./.vivace)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # that module has no commands yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (VivaceCLIError, ValueError, OSError, RuntimeError) as exc:
        # Users get one line naming the problem; VIVACE_DEBUG=1 shows the traceback.
        if os.environ.get("VIVACE_DEBUG"):
            raise
        print(f"vivace {args.command}: error: {exc}", file=sys.stderr)
        return 1


class VivaceCLIError(Exception):
    """An error the CLI reports as one line, without a traceback."""


if __name__ == "__main__":
    sys.exit(main())
