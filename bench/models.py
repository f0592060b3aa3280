"""`vivace bench models`: each model type Vivace serves, through HTTP, against the
TorchScript path for the same model, in the same run.

The reference MLP (32→256→256→1 + sigmoid) is served as TorchScript (`torchscript`, the
peer), exported to ONNX for onnxruntime (`onnx`), and as a Python model computing it with
numpy from the same weights (`python`). Every server runs for the whole
benchmark, pinned to the same core; wrk (one row per request, OIP JSON) visits them in
turn, round after round, so a change in the machine's load hits every type alike. Printed
per type and concurrency: the median req/s and server CPU per request over the rounds,
and the ratio to TorchScript of each round and their median.
"""
from __future__ import annotations

import io
import sys
import tempfile
import warnings
from pathlib import Path

from .http import _start, _stop, add_load_options, compare_rounds, interleaved_rounds, pinned_cpus, wrk_missing

PEER = "torchscript"


def write_onnx_reference(out: Path) -> None:
    """The reference MLP exported to ONNX (torch's TorchScript-based exporter, a dynamic
    batch axis) and packaged for onnxruntime as `vivace package model.onnx` does."""
    import torch

    from vivace.registry.packaging import package_onnx_model
    from vivace.registry.reference_model import IN_FEATURES, reference_module

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(reference_module(), (torch.zeros(2, IN_FEATURES),), buffer, input_names=["input__0"],
                          output_names=["output__0"], dynamic_axes={"input__0": {0: "batch"}, "output__0": {0: "batch"}},
                          dynamo=False)
    package_onnx_model(buffer.getvalue(), out, name="mlp")


NUMPY_MLP = """
import numpy as np


class MLP:
    def load(self):
        weights = np.load(self.package_dir / "weights.npz")
        self.layers = [(weights[f"w{i}"].T.copy(), weights[f"b{i}"]) for i in range(3)]

    def predict(self, x):
        for i, (w, b) in enumerate(self.layers):
            x = x @ w + b
            x = np.maximum(x, 0) if i < 2 else 1 / (1 + np.exp(-x))
        return x
"""


def write_python_reference(tmp: Path, out: Path) -> None:
    """The reference MLP as a Python model: numpy on the same weights."""
    import numpy as np

    from vivace.registry.packaging import package_python_model
    from vivace.registry.reference_model import IN_FEATURES, reference_module

    linear = [m for m in reference_module() if hasattr(m, "weight")]
    np.savez(tmp / "weights.npz", **{f"w{i}": m.weight.detach().numpy() for i, m in enumerate(linear)},
             **{f"b{i}": m.bias.detach().numpy() for i, m in enumerate(linear)})
    (tmp / "mlp.py").write_text(NUMPY_MLP)
    package_python_model(f"{tmp / 'mlp.py'}:MLP", out, name="mlp", inputs=[f"input__0:FP32:{IN_FEATURES}"],
                         outputs=["output__0:FP32:1"], files=[tmp / "weights.npz"])


def packages(tmp: Path, types: list[str]) -> dict[str, Path]:
    from vivace.registry.reference_model import write_reference_model

    made = {PEER: tmp / PEER}
    write_reference_model(made[PEER])
    if "onnx" in types:
        made["onnx"] = tmp / "onnx"
        write_onnx_reference(made["onnx"])
    if "python" in types:
        made["python"] = tmp / "python"
        write_python_reference(tmp, made["python"])
    # Same model, same answers: checked before anything is timed.
    import numpy as np

    from vivace.engine import Scorer

    rows = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    expected = Scorer(made[PEER]).predict(rows)
    for name, package in made.items():
        if not np.allclose(Scorer(package).predict(rows), expected, rtol=1e-4, atol=1e-5):
            raise RuntimeError(f"the {name} package answers differently from TorchScript: not measuring")
    return made


def benchmark(types: list[str], duration: float, rounds: int, concurrencies: list[int],
              server_cpu: int | None, client_cpu: int | None, port: int = 18100) -> dict:
    """{(type, concurrency): [Result per round]}"""
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="vivace-bench-models-") as tmp:
        made = packages(Path(tmp), types)
        procs = {}
        try:
            for i, (name, package) in enumerate(made.items()):
                cmd = [sys.executable, "-m", "vivace.cli", "serve", str(package), "--port", str(port + i),
                       "--log-level", "WARNING"]
                procs[name] = (port + i, _start(cmd, server_cpu, port + i))
            interleaved_rounds(procs, concurrencies, rounds, duration, client_cpu, results)
        finally:
            for _, proc in procs.values():
                _stop(proc)
    return results


def summarize(results: dict, types: list[str], concurrencies: list[int]) -> list[str]:
    return [f"c={c}: {name} / {PEER}, same MLP: {compare_rounds(results[(name, c)], results[(PEER, c)])}"
            for c in concurrencies for name in types]


def register(subparsers) -> None:
    parser = subparsers.add_parser("models", help="each model type through HTTP vs TorchScript, same model, same run")
    add_load_options(parser, duration=3.0)
    parser.add_argument("--rounds", type=int, default=3, help="times each type is measured, interleaved")
    parser.add_argument("--types", default="onnx,python", help="comma-separated model types to compare "
                        "with TorchScript (onnx, python)")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    if wrk_missing("models"):
        return 1
    types = [t for t in args.types.split(",") if t]
    unknown = set(types) - {"onnx", "python"}
    if unknown or not types:
        print(f"vivace bench models: unknown types {sorted(unknown)} (known: onnx, python)", file=sys.stderr)
        return 2
    if "onnx" in types:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:  # the type to measure is missing: say so, never measure less
            print("vivace bench models: onnx needs onnxruntime (pip install 'vivace[onnx]')", file=sys.stderr)
            return 1
    from .drift import cpu_description

    server_cpu, client_cpu = pinned_cpus(args)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    print(f"vivace bench models: {args.duration:g} s per point, {args.rounds} rounds, server cpu {server_cpu}, "
          f"client cpu {client_cpu}; {cpu_description()}")
    results = benchmark(types, args.duration, args.rounds, concurrencies, server_cpu, client_cpu)
    for line in summarize(results, types, concurrencies):
        print(line)
    return 0
