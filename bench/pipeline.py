"""`vivace bench pipeline`: a three-step pipeline served as one Vivace ensemble, against
the same steps glued by hand in a FastAPI app, same load, same run.

The pipeline: a Python step standardising the 32 features (numpy), the reference MLP
converted by `vivace quantize` to the native fp32 kernel, and a Python step turning its
probability into a label (a BYTES output). Vivace serves it with `vivace serve`; the peer is
the FastAPI baseline in its strongest form (uvicorn with uvloop and httptools, an asyncio
batching queue, gc.freeze) running the same step code per batch. Both answer the same rows
the same way (checked first); each is pinned to the same core and driven by wrk, in turn,
round after round. Printed: req/s, p99 and server CPU per request, and Vivace/FastAPI ratios.
"""
from __future__ import annotations

import json
import sys
import tempfile
import urllib.request
from pathlib import Path

from .http import LUA, _start, _stop, add_load_options, compare_rounds, interleaved_rounds, pinned_cpus, wrk_missing

STANDARDIZE = '''
import numpy as np


class Standardize:
    def predict(self, x):
        return {"standardized": (x - 0.15) / 0.1}
'''
LABEL = '''
import numpy as np


class Label:
    def predict(self, probability):
        return {"score": probability, "label": np.where(probability >= 0.5, b"yes", b"no").astype(object)}
'''


def write_pipeline(tmp: Path) -> Path:
    """The three step packages and the ensemble joining them; returns the ensemble's directory."""
    from vivace.engine.native.convert import quantize_package
    from vivace.registry.packaging import package_ensemble, package_python_model
    from vivace.registry.reference_model import IN_FEATURES, write_reference_model

    (tmp / "standardize.py").write_text(STANDARDIZE)
    (tmp / "label.py").write_text(LABEL)
    pre = package_python_model(f"{tmp / 'standardize.py'}:Standardize", tmp / "pre", name="pre",
                               inputs=[f"input__0:FP32:{IN_FEATURES}"])
    write_reference_model(tmp / "mlp")
    model = quantize_package(tmp / "mlp", tmp / "mlp-native", precision="fp32")[0]
    post = package_python_model(f"{tmp / 'label.py'}:Label", tmp / "post", name="post", inputs=["probability:FP32:1"])
    return package_ensemble([("pre", pre.path), ("model", model.path), ("post", post.path)], tmp / "pipeline",
                            name="mlp", tensor_map={"model.input__0": "standardized",
                                                    "model.output__0": "probability"}).path


def _answer(port: int) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/mlp/infer",
                                     data=LUA.read_text().split("wrk.body = '")[1].split("'")[0].encode())
    with urllib.request.urlopen(request, timeout=30) as response:
        return {o["name"]: o["data"] for o in json.loads(response.read())["outputs"]}


def benchmark(duration: float, rounds: int, concurrencies: list[int], server_cpu: int | None,
              client_cpu: int | None, port: int = 18200) -> dict:
    """{(server, concurrency): [Result per round]}"""
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="vivace-bench-pipeline-") as tmp:
        pipeline = write_pipeline(Path(tmp))
        servers = {
            "vivace": (port, [sys.executable, "-m", "vivace.cli", "serve", str(pipeline), "--port", str(port),
                              "--log-level", "WARNING"]),
            "fastapi": (port + 1, [sys.executable, "-m", "vivace.bench.baselines.fastapi_server", str(pipeline),
                                   "--port", str(port + 1)]),
        }
        procs = {}
        try:
            for name, (p, cmd) in servers.items():
                procs[name] = (p, _start(cmd, server_cpu, p))
            answers = {name: _answer(p) for name, (p, _) in procs.items()}
            if answers["vivace"]["label"] != answers["fastapi"]["label"] or \
                    abs(answers["vivace"]["score"][0] - answers["fastapi"]["score"][0]) > 1e-6:
                raise RuntimeError(f"the two servers answer differently ({answers}): not measuring")
            interleaved_rounds(procs, concurrencies, rounds, duration, client_cpu, results)
        finally:
            for _, proc in procs.values():
                _stop(proc)
    return results


def summarize(results: dict, concurrencies: list[int]) -> list[str]:
    return [f"c={c}: pipeline vivace / fastapi: {compare_rounds(results[('vivace', c)], results[('fastapi', c)])}"
            for c in concurrencies]


def register(subparsers) -> None:
    parser = subparsers.add_parser("pipeline", help="a 3-step ensemble through HTTP vs the same steps in FastAPI")
    add_load_options(parser, duration=3.0)
    parser.add_argument("--rounds", type=int, default=3, help="times each server is measured, interleaved")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    if wrk_missing("pipeline"):
        return 1
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:  # the peer is missing: say so, never measure less
        print("vivace bench pipeline: the FastAPI peer needs fastapi and uvicorn (pip install 'vivace[bench]')",
              file=sys.stderr)
        return 1
    from .drift import cpu_description

    server_cpu, client_cpu = pinned_cpus(args)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    print(f"vivace bench pipeline: {args.duration:g} s per point, {args.rounds} rounds, server cpu {server_cpu}, "
          f"client cpu {client_cpu}; {cpu_description()}")
    for line in summarize(benchmark(args.duration, args.rounds, concurrencies, server_cpu, client_cpu),
                          concurrencies):
        print(line)
    return 0
