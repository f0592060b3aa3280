"""`vivace bench monitoring`: HTTP throughput with online drift monitoring on vs off.

The reference MLP is packaged with a reference profile of its inputs and predictions, so
`vivace serve` sketches every batch natively and checks drift every second. The same
package is then served with `--no-drift`. Each server is pinned to one core and driven by
wrk from the other; the ratio is the cost of monitoring (issue 6's target: >= 90%).
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from .http import _start, _stop, add_load_options, pinned_cpus, print_result, run_wrk


def build(root: Path) -> Path:
    """The reference package plus a profile of 20,000 N(0, 1) rows and their predictions."""
    import numpy as np

    from vivace.engine import Scorer
    from vivace.monitor.drift import build_profile
    from vivace.registry.package import write_package

    from vivace.registry.reference_model import write_reference_model

    plain = write_reference_model(root / "mlp")
    rows = np.random.default_rng(0).standard_normal((20_000, 32)).astype(np.float32)
    profile = build_profile({f"f{i}": rows[:, i] for i in range(32)}, predictions=Scorer(plain).predict(rows))
    manifest = plain.manifest()
    manifest["metadata"] = {"profile": "profile.json"}
    path = root / "mlp-profiled"
    write_package(path, manifest, {"model.pt": (plain.path / "model.pt").read_bytes(),
                                   "profile.json": json.dumps(profile).encode()})
    return path


def register(subparsers) -> None:
    parser = subparsers.add_parser("monitoring", help="HTTP throughput with drift monitoring on vs off")
    add_load_options(parser, duration=8.0)
    parser.set_defaults(func=_run)


def _run(args) -> int:
    server_cpu, client_cpu = pinned_cpus(args)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    results = {}
    with tempfile.TemporaryDirectory(prefix="vivace-bench-monitoring-") as tmp:
        package = build(Path(tmp))
        for label, extra in (("monitoring on", ["--drift-interval", "1"]), ("monitoring off", ["--no-drift"])):
            port = 18200 if label == "monitoring on" else 18201
            cmd = [sys.executable, "-m", "vivace.cli", "serve", str(package), "--port", str(port),
                   "--log-level", "WARNING", *extra]
            proc = _start(cmd, server_cpu, port)
            try:
                run_wrk(port, 16, 1.0, client_cpu, proc.pid, label)  # warm-up
                for c in concurrencies:
                    r = run_wrk(port, c, args.duration, client_cpu, proc.pid, label)
                    results[(label, c)] = r
                    print_result(r)
            finally:
                _stop(proc)
    for c in concurrencies:
        on, off = results[("monitoring on", c)], results[("monitoring off", c)]
        print(f"c={c}: throughput with monitoring = {on.requests_per_s / off.requests_per_s:.0%} of without")
    return 0
