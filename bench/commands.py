"""`vivace bench ...`: each benchmark module adds its own subcommand.

A benchmark module `vivace.bench.<topic>` defines `register(subparsers)`; the ones present
are listed here. Benchmarks drive the public CLI, HTTP and Python APIs only.
"""
from __future__ import annotations

import importlib

BENCH_MODULES = [
    "vivace.bench.model",
    "vivace.bench.http",
    "vivace.bench.models",
    "vivace.bench.trees",
    "vivace.bench.pipeline",
    "vivace.bench.scorer",
    "vivace.bench.ray",
    "vivace.bench.kernels",
    "vivace.bench.features",
    "vivace.bench.entities",
    "vivace.bench.drift",
    "vivace.bench.monitoring",
    "vivace.bench.quality",
    "vivace.bench.lifecycle",
    "vivace.bench.overload",
    "vivace.bench.rollout",
    "vivace.bench.chaos",
]


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks and the benchmark reference model")
    sub = parser.add_subparsers(dest="bench_command", metavar="BENCH")
    for name in BENCH_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(sub)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
