"""`vivace bench rollout`: what a canary rollout costs the requests it routes.

One server follows `mlp@production` (the reference MLP, registered twice as versions 1
and 2), pinned to one core and driven by wrk on another. Rounds alternate, in the same
run: the alias alone (every request to version 1), then a rollout of version 2 at
`--weight` percent (default 50/50)
(started and aborted through the `vivace rollout` command, applied live by the server).
Printed per front end: req/s and CPU µs per request each way, and the ratio rollout /
single version. The native front end draws the version of a plain weighted rollout per
request in C++ (a sticky or shadowed rollout is routed in Python, which this does not
measure); the Python front end routes every rollout in Python.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from .drift import cpu_description
from .http import Result, _start, _stop, add_load_options, pinned_cpus, run_wrk, wrk_missing


def _vivace(home: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "vivace", "--home", str(home), *args], check=True, capture_output=True,
                   timeout=120)


def _rollout_applied(port: int, canary: str | None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/mlp/rollout", timeout=5) as response:
            if json.loads(response.read())["canary"] == canary:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server did not apply the rollout change (canary {canary}) in {timeout:g} s")
        time.sleep(0.05)


def benchmark(frontends: list[str], concurrency: int, duration: float, rounds: int, server_cpu: int | None,
              client_cpu: int | None, weight: float = 50.0, native: bool = False,
              port: int = 18200) -> dict[str, list[tuple[Result, Result]]]:
    from vivace.registry.reference_model import write_reference_model

    out: dict[str, list[tuple[Result, Result]]] = {}
    with tempfile.TemporaryDirectory(prefix="vivace-bench-rollout-") as tmp:
        home, package = Path(tmp) / "home", Path(tmp) / "mlp"
        write_reference_model(package)
        if native:  # the same model on the native fp32 kernel, as `vivace quantize` writes it
            _vivace(home, "quantize", str(package), "--out", str(Path(tmp) / "mlp-native"))
            package = Path(tmp) / "mlp-native"
        for _ in range(2):
            _vivace(home, "models", "register", str(package), "--name", "mlp")
        _vivace(home, "models", "alias", "mlp", "1", "production")
        for frontend in frontends:
            cmd = [sys.executable, "-m", "vivace", "--home", str(home), "serve", "mlp@production", "--port", str(port),
                   "--log-level", "WARNING", "--follow-interval", "0.05", "--no-drift", "--http-frontend", frontend]
            proc = _start(cmd, server_cpu, port)
            try:
                run_wrk(port, 16, 1.0, client_cpu, proc.pid, "warm-up")
                pairs = []
                for _ in range(rounds):
                    single = run_wrk(port, concurrency, duration, client_cpu, proc.pid, f"{frontend} single")
                    _vivace(home, "rollout", "start", "mlp@production", "--canary", "2", "--weight", f"{weight:g}")
                    _rollout_applied(port, "2")
                    split = run_wrk(port, concurrency, duration, client_cpu, proc.pid, f"{frontend} rollout")
                    _vivace(home, "rollout", "abort", "mlp@production")
                    _rollout_applied(port, None)
                    pairs.append((single, split))
                    print(f"  {frontend:6s} c={concurrency}: single version {single.requests_per_s:9,.0f} req/s "
                          f"({single.cpu_us_per_request:5.1f} µs CPU/req) | {weight:g}% canary "
                          f"{split.requests_per_s:9,.0f} req/s ({split.cpu_us_per_request:5.1f} µs) | rollout/single "
                          f"{split.requests_per_s / single.requests_per_s:5.2f}x", flush=True)
                out[frontend] = pairs
            finally:
                _stop(proc)
            port += 1
    return out


def register(subparsers) -> None:
    parser = subparsers.add_parser("rollout", help="throughput of a canary rollout vs one version, same run")
    add_load_options(parser, duration=4.0)
    parser.set_defaults(concurrency="64")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved single/rollout rounds per front end")
    parser.add_argument("--http-frontend", default="native,python", help="comma-separated: native, python")
    parser.add_argument("--native", action="store_true",
                        help="serve the model converted to the native fp32 kernel (vivace quantize) instead of TorchScript")
    parser.add_argument("--weight", type=float, default=50.0,
                        help="percent of requests to the canary (50: each version batches half the requests)")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    if wrk_missing("rollout"):
        return 1
    server_cpu, client_cpu = pinned_cpus(args)
    concurrency = int(args.concurrency.split(",")[0])
    print(f"CPU: {cpu_description()}; server on core {server_cpu}, wrk on core {client_cpu}; pid {os.getpid()}")
    results = benchmark(args.http_frontend.split(","), concurrency, args.duration, args.rounds, server_cpu,
                        client_cpu, args.weight, args.native)
    for frontend, pairs in results.items():
        ratios = sorted(split.requests_per_s / single.requests_per_s for single, split in pairs)
        cpu = sorted(split.cpu_us_per_request / single.cpu_us_per_request for single, split in pairs)
        print(f"{frontend}: rollout/single throughput {ratios[0]:.2f}-{ratios[-1]:.2f}x "
              f"(median {ratios[len(ratios) // 2]:.2f}); CPU per request x{cpu[len(cpu) // 2]:.2f} (median)")
    return 0
