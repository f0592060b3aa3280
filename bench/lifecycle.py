"""`vivace bench lifecycle`: registry overhead and fresh-process load+predict, vs MLflow.

Measures, in one run on this machine:
  1. register + set alias + resolve (verified) of a small MLP package, in-process (ms);
  2. a fresh Python process that resolves `name@champion`, loads the TorchScript model and
     predicts one row (what `vivace score NAME@ALIAS` does with the torch backend), next to
     a fresh process that only runs `import torch` (the floor any torch backend pays);
  3. the same two measurements with MLflow (sqlite tracking store, pytorch flavor) when
     mlflow is importable; otherwise it says so and compares against the floor only.

Everything stays on the local disk; nothing listens on a socket. Bounded to well under
two minutes with the defaults.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

FEATURES = 6
SCORE_SNIPPET = """
import sys, torch
from vivace.registry import resolve
path = resolve(sys.argv[1], sys.argv[2])
model = torch.jit.load(str(path / "model.pt"))
with torch.no_grad():
    print(float(model(torch.zeros(1, {features}))[0, 0]))
"""
MLFLOW_SCORE_SNIPPET = """
import sys, torch, mlflow.pytorch
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pytorch.load_model(sys.argv[2])
with torch.no_grad():
    print(float(model(torch.zeros(1, {features}))[0, 0]))
"""


def _mlp():
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16),
                               torch.nn.ReLU(), torch.nn.Linear(16, 1), torch.nn.Sigmoid()).eval()


def _write_packages(root: Path, count: int) -> list[Path]:
    """`count` distinct packages (same model, different note) so each register really copies."""
    import torch

    from vivace.registry.package import write_package

    buffer = io.BytesIO()
    torch.jit.save(torch.jit.trace(_mlp(), torch.zeros(2, FEATURES)), buffer)
    manifest = {"name": "bench-mlp", "version": "1", "platform": "torchscript", "model_file": "model.pt",
                "inputs": [{"name": "input__0", "datatype": "FP32", "shape": [-1, FEATURES]}],
                "outputs": [{"name": "output__0", "datatype": "FP32", "shape": [-1, 1]}], "max_batch_size": 128}
    packages = []
    for i in range(count):
        path = root / f"pkg{i}"
        write_package(path, manifest, {"model.pt": buffer.getvalue(), "note.txt": f"build {i}".encode()})
        packages.append(path)
    return packages


def _fresh_rounds(commands: dict[str, tuple[list[str], dict[str, str] | None]], runs: int) -> dict[str, float]:
    """Median wall seconds of fresh processes per command.

    The commands take turns round by round (after one untimed warm-up each for the page
    cache), so that load from other users of the machine falls on all of them alike.
    """
    times: dict[str, list[float]] = {name: [] for name in commands}
    for round_ in range(runs + 1):
        for name, (cmd, env) in commands.items():
            start = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True, env=env, timeout=120)
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_vivace(root: Path, iterations: int) -> tuple[dict[str, Any], list[str]]:
    """In-process figures, and the command a fresh scoring process runs."""
    from vivace.registry import Home, resolve
    from vivace.registry.models import register_model, set_alias

    import torch

    packages = _write_packages(root / "src", iterations)
    home = Home(root / "home")
    samples, with_load = [], []
    for pkg in packages:
        start = time.perf_counter()
        version = register_model(home, pkg, "bench").version
        set_alias(home, "bench", version, "champion")
        path = resolve(home, "bench@champion")
        resolved = time.perf_counter()
        torch.jit.load(str(path / "model.pt"))
        samples.append(resolved - start)
        with_load.append(time.perf_counter() - start)
    home.close()
    score = [sys.executable, "-c", SCORE_SNIPPET.format(features=FEATURES), str(root / "home"), "bench@champion"]
    return {"register_alias_resolve_ms": statistics.median(samples) * 1e3,
            "register_alias_load_ms": statistics.median(with_load) * 1e3}, score


def bench_mlflow(root: Path, iterations: int) -> tuple[dict[str, Any], list[str], dict[str, str]] | None:
    """In-process figures, the fresh scoring command and its environment; None without mlflow."""
    # Telemetry off: this machine has no network, and waiting on it is not MLflow's real cost.
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
    os.environ.update(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
    try:
        import mlflow
        import mlflow.pytorch
        from mlflow import MlflowClient
    except ImportError:
        return None
    import logging

    logging.getLogger("mlflow").setLevel(logging.ERROR)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(uri, uri)
    import numpy as np

    with mlflow.start_run() as run:
        # An input example is what recent MLflow needs to export the model; older ones accept it too.
        mlflow.pytorch.log_model(_mlp(), "model", input_example=np.zeros((1, FEATURES), dtype="float32"))
    source = f"runs:/{run.info.run_id}/model"
    samples = []
    for _ in range(iterations):
        with contextlib.redirect_stderr(io.StringIO()):  # MLflow prints a line per version
            start = time.perf_counter()
            version = mlflow.register_model(source, "bench").version
            client.set_registered_model_alias("bench", "champion", version)
            mlflow.pytorch.load_model("models:/bench@champion")
            samples.append(time.perf_counter() - start)
    score = [sys.executable, "-c", MLFLOW_SCORE_SNIPPET.format(features=FEATURES), uri, "models:/bench@champion"]
    return {"register_alias_load_ms": statistics.median(samples) * 1e3, "version": mlflow.__version__}, score, env


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="vivace-bench-lifecycle-") as tmp:
        root = Path(tmp)
        vivace, vivace_score = bench_vivace(root, args.iterations)
        commands = {"floor": ([sys.executable, "-c", "import torch"], None), "vivace": (vivace_score, None)}
        mlflow = None
        measured = None if args.no_mlflow else bench_mlflow(root / "mlflow", max(3, args.iterations // 4))
        if measured is not None:
            mlflow, mlflow_score, env = measured
            commands["mlflow"] = (mlflow_score, env)
        fresh = _fresh_rounds(commands, args.fresh_runs)
    floor = fresh["floor"]
    vivace["fresh_score_s"] = fresh["vivace"]
    if mlflow is not None:
        mlflow["fresh_score_s"] = fresh["mlflow"]
    results: dict[str, Any] = {"machine_cpus": os.cpu_count(), "import_torch_s": floor, "vivace": vivace,
                               "mlflow": mlflow}
    print(f"lifecycle benchmark ({args.iterations} registrations, {args.fresh_runs} fresh processes each; "
          f"{os.cpu_count()} CPUs, numbers are noisy on a shared machine)")
    rows = [
        ("fresh `python -c 'import torch'` (floor)", f"{floor:.3f} s", ""),
        ("vivace register + alias + resolve (median)", f"{vivace['register_alias_resolve_ms']:.2f} ms",
         "target <= 20 ms"),
        ("vivace register + alias + resolve + jit.load", f"{vivace['register_alias_load_ms']:.2f} ms", ""),
        ("vivace fresh resolve + load + predict 1 row", f"{vivace['fresh_score_s']:.3f} s",
         f"{vivace['fresh_score_s'] / floor:.2f}x the import-torch floor; target <= 1.5 s"),
    ]
    if mlflow is not None:
        rows += [
            (f"mlflow {mlflow['version']} register + alias + load", f"{mlflow['register_alias_load_ms']:.2f} ms",
             f"vivace {mlflow['register_alias_load_ms'] / vivace['register_alias_load_ms']:.1f}x faster"),
            ("mlflow fresh load models:/bench@champion + predict", f"{mlflow['fresh_score_s']:.3f} s",
             f"vivace {mlflow['fresh_score_s'] / vivace['fresh_score_s']:.2f}x faster"),
        ]
    for label, value, note in rows:
        print(f"  {label:<52} {value:>11}" + (f"   ({note})" if note else ""))
    if mlflow is None:
        print("  mlflow: not installed (or --no-mlflow): skipped; the issue measured 0.11 s for"
              " register + alias + load and 3.4 s for a fresh load + predict")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("lifecycle", help="registry register+alias+resolve and fresh load+predict, vs MLflow")
    p.add_argument("--iterations", type=int, default=20, help="registrations to time (default 20)")
    p.add_argument("--fresh-runs", type=int, default=3, help="fresh processes to time per variant (default 3)")
    p.add_argument("--no-mlflow", action="store_true", help="skip MLflow even when it is installed")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(func=run)
