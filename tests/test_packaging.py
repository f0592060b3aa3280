"""Serving one's own torch model, as a new user would: `vivace package` (CLI) and
`package_torch_model` (Python), registering it with metrics, and the errors on the way."""
from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import numpy as np
import pytest

from conftest import ServerProcess
from vivace.registry.package import PackageError, load_package
from vivace.registry.packaging import package_torch_model


def vivace(*args, home=None) -> subprocess.CompletedProcess:
    extra = ["--home", str(home)] if home is not None else []
    return subprocess.run([sys.executable, "-m", "vivace", *extra, *map(str, args)],
                          capture_output=True, text=True, timeout=180)


def two_heads():
    import torch

    torch.manual_seed(1)

    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(8, 16)
            self.score = torch.nn.Linear(16, 2)

        def forward(self, x):
            return torch.softmax(self.score(torch.relu(self.body(x))), dim=1)

    return TwoHeads().eval()


def infer(server, model, rows):
    body = json.dumps({"inputs": [{"name": "features", "shape": list(rows.shape), "datatype": "FP32",
                                   "data": rows.ravel().tolist()}]}).encode()
    request = urllib.request.Request(f"{server.url}/v2/models/{model}/infer", data=body, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        out = json.loads(response.read())["outputs"][0]
    return np.asarray(out["data"], np.float32).reshape(out["shape"])


@pytest.mark.parametrize("platform", ["torchscript", "torch_export"])
def test_a_module_packaged_from_python_serves_what_it_computes(tmp_path, platform):
    import torch

    module = two_heads()
    package = package_torch_model(module, tmp_path / "mine", name="mine", platform=platform,
                                  example=torch.randn(4, 8), inputs=["features:FP32:8"], outputs=["probs:FP32:2"])
    assert [(s.name, s.datatype, list(s.shape)) for s in package.outputs] == [("probs", "FP32", [-1, 2])]
    load_package(tmp_path / "mine")  # hashes verify
    server = ServerProcess([tmp_path / "mine"])
    try:
        rows = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
        expected = module(torch.from_numpy(rows)).detach().numpy()
        np.testing.assert_allclose(infer(server, "mine", rows), expected, rtol=1e-5, atol=1e-6)
    finally:
        assert server.stop() == 0


def test_the_cli_packages_a_torchscript_file_and_registers_it_with_metrics(tmp_path):
    import torch

    torch.jit.save(torch.jit.trace(two_heads(), torch.zeros(1, 8)), tmp_path / "model.pt")
    made = vivace("package", tmp_path / "model.pt", "--out", tmp_path / "pkg", "--name", "mine",
                  "--input", "features:FP32:8", "--output", "probs:FP32:2", "--max-batch-size", "64",
                  "--param", "torch_num_threads=2")
    assert made.returncode == 0, made.stderr
    package = load_package(tmp_path / "pkg")
    assert package.max_batch_size == 64 and package.parameters["torch_num_threads"] == 2
    home = tmp_path / "home"
    (tmp_path / "metrics.json").write_text('{"auc": 0.5, "accuracy": 0.8}')
    registered = vivace("models", "register", tmp_path / "pkg", "--name", "mine", "--metrics",
                        tmp_path / "metrics.json", "--metric", "auc=0.91", home=home)
    assert registered.returncode == 0, registered.stderr
    shown = json.loads(vivace("models", "show", "mine@latest", "--json", home=home).stdout)
    assert shown["metrics"] == {"auc": 0.91, "accuracy": 0.8}


def test_packaging_errors_name_the_problem_and_write_nothing(tmp_path):
    import torch

    torch.jit.save(torch.jit.trace(two_heads(), torch.zeros(1, 8)), tmp_path / "model.pt")
    cases = [
        (["--input", "features:FP32:8", "--output", "probs:FP32:3"], "declared FP32 [-1, 3], the model returns FP32 [-1, 2]"),
        (["--input", "features:FP32:5"], "failed on a batch of 2 rows"),
        (["--input", "features:FP99:8"], "unknown datatype 'FP99'"),
        (["--input", "features:FP32:eight"], "dimensions must be integers"),
    ]
    for extra, message in cases:
        result = vivace("package", tmp_path / "model.pt", "--out", tmp_path / "bad", "--name", "bad", *extra)
        assert result.returncode == 1 and message in result.stderr, (extra, result.stderr)
        assert not (tmp_path / "bad").exists()
    missing = vivace("package", tmp_path / "nope.pt", "--out", tmp_path / "bad", "--name", "bad", "--input", "x:FP32:8")
    assert missing.returncode == 1 and "no such model file" in missing.stderr
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a model")
    garbage = vivace("package", tmp_path / "garbage.pt", "--out", tmp_path / "bad", "--name", "bad",
                     "--input", "x:FP32:8")
    assert garbage.returncode == 1 and "cannot load the model" in garbage.stderr
    assert vivace("package", tmp_path / "model.pt", "--out", tmp_path / "good", "--name", "good",
                  "--input", "features:FP32:8").returncode == 0
    for metric, message in (("auc=high", "is not a number"), ("auc=nan", "must be a finite number"),
                            ("auc", "expected KEY=VALUE")):
        refused = vivace("models", "register", tmp_path / "good", "--name", "good", "--metric", metric,
                         home=tmp_path / "home")
        assert refused.returncode == 1 and message in refused.stderr, (metric, refused.stderr)
    assert "good" not in vivace("models", "list", home=tmp_path / "home").stdout  # nothing half-registered
    with pytest.raises(PackageError, match="declare the inputs"):
        package_torch_model(two_heads(), tmp_path / "bad", name="bad")


def test_an_attached_profile_turns_on_drift_monitoring(tmp_path):
    import pandas as pd
    import torch

    rng = np.random.default_rng(0)
    pd.DataFrame(rng.normal(size=(2000, 8)), columns=[f"f{i}" for i in range(8)]).to_parquet(tmp_path / "train.parquet")
    profiled = vivace("monitor", "profile", tmp_path / "train.parquet", "--out", tmp_path / "profile.json")
    assert profiled.returncode == 0, profiled.stderr
    package_torch_model(two_heads(), tmp_path / "mine", name="mine", example=torch.zeros(2, 8),
                        inputs=["features:FP32:8"], profile=tmp_path / "profile.json")
    with pytest.raises(PackageError, match="profiles 8 features, the input 'features' has 4 columns"):
        package_torch_model(torch.nn.Linear(4, 1), tmp_path / "other", name="other", inputs=["features:FP32:4"],
                            profile=tmp_path / "profile.json")
    server = ServerProcess([tmp_path / "mine"], "--drift-interval", "0.2")
    try:
        infer(server, "mine", rng.normal(size=(8, 8)).astype(np.float32))
        with urllib.request.urlopen(f"{server.url}/v2/models/mine/drift", timeout=10) as response:
            status = json.loads(response.read())
        assert response.status == 200 and status
    finally:
        assert server.stop() == 0
