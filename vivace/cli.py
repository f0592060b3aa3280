"""The `vivace` command: the shell on top that composes the parts.

One console script, one subcommand group per part. Each part declares its own commands in a
module with `register(subparsers)` (engine/commands.py, registry/cli.py, ...); this shell
only knows which module provides which command. It is the one place that imports the
benchmark harness (`vivace bench`).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from vivace.errors import VivaceCLIError

# Modules that contribute subcommands: each has `register(subparsers)` adding parsers
# whose `func(args) -> int` runs the command. A command names its module below, so a
# fresh `vivace score` imports only what scoring needs; `vivace --help` imports them all.
COMMANDS = {
    "serve": "vivace.engine.commands", "score": "vivace.engine.commands", "demo": "vivace.engine.commands",
    "quantize": "vivace.engine.native.cli", "auth": "vivace.engine.auth", "deploy": "vivace.engine.deploy",
    "bench": "vivace.bench.commands",
    "package": "vivace.registry.cli",
    "data": "vivace.registry.cli", "models": "vivace.registry.cli", "runs": "vivace.registry.cli",
    "train": "vivace.registry.cli", "audit": "vivace.registry.cli", "rollout": "vivace.registry.cli",
    "pipeline": "vivace.registry.pipeline_cli",
    "features": "vivace.features.cli",
    "monitor": "vivace.monitor.cli",
}
COMMAND_MODULES = list(dict.fromkeys(COMMANDS.values()))


def _command_in(argv: list[str]) -> str | None:
    """The subcommand named on the command line, skipping the global --home option."""
    args = iter(argv)
    for arg in args:
        if arg == "--home":
            next(args, None)
        elif not arg.startswith("-"):
            return arg
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vivace", description="Vivace ML serving engine")
    parser.add_argument(
        "--home",
        default=os.environ.get("VIVACE_HOME", "./.vivace"),
        help="Vivace home: SQLite metadata, artifacts, online store (default: $VIVACE_HOME or ./.vivace)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = [COMMANDS[command]] if command in COMMANDS else COMMAND_MODULES
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # that module has no commands yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(_command_in(argv))
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


if __name__ == "__main__":
    sys.exit(main())
