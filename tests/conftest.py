"""Shared fixtures: the reference model package and a real `vivace serve` on loopback."""
from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def mlp_package(tmp_path_factory) -> Path:
    from vivace.registry.reference_model import write_reference_model

    path = tmp_path_factory.mktemp("models") / "mlp"
    write_reference_model(path)
    return path


class ServerProcess:
    """`vivace serve` in a subprocess on a free loopback port."""

    def __init__(self, packages: list[Path], *extra: str, env: dict | None = None, tls=None):
        """`tls`: an ssl.SSLContext trusting the server's certificate (the server is HTTPS)."""
        self.port = free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "vivace.cli", "serve", *map(str, packages),
               "--port", str(self.port), "--log-level", "WARNING", *extra]
        self.proc = subprocess.Popen(cmd, env=dict(os.environ, **(env or {})),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/v2/health/ready", timeout=1, context=tls):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module", params=["native", "python"])
def server(mlp_package, request):
    """The reference model served through each HTTP front end (the native one is the
    default; the Python one serves TLS and auth): the same HTTP tests hold for both."""
    srv = ServerProcess([mlp_package], "--max-body-bytes", str(1 << 20), "--header-timeout", "1",
                        "--body-timeout", "1", "--http-frontend", request.param)
    yield srv
    assert srv.stop() == 0


def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):
    """Poll `predicate` until it returns something truthy (returned), or fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def slow_model_bytes(matmuls: int) -> bytes:
    """TorchScript spending `matmuls` 500x500 matrix products per batch, whatever its size
    (about 3 ms each here), then answering sigmoid of a constant. The work depends on the
    input, so the JIT cannot fold it into a constant."""
    import io

    import torch

    class Slow(torch.nn.Module):
        def __init__(self, n: int):
            super().__init__()
            self.n = n

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = torch.ones(500, 500) / 500.0 + x[0, 0] * 0.0
            for _ in range(self.n):
                a = a @ a
            return torch.sigmoid(x[:, :1] * 0.0 + a[0, 0])

    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(Slow(matmuls)), buffer)
    return buffer.getvalue()


# -- an online feature store and two models served by entity id (test_serving_entities,
# test_tracing) ---------------------------------------------------------------------------
N_FEATURES = 4
WEIGHTS = np.array([1.0, 10.0, 100.0, 1000.0], np.float32)


def feature_values(keys: np.ndarray) -> np.ndarray:
    return np.stack([keys * 0.5 + j for j in range(N_FEATURES)], axis=1).astype(np.float32)


@pytest.fixture(scope="module")
def entity_home(tmp_path_factory):
    import torch

    from vivace.bench.entities import customer_store
    from vivace.registry.package import write_package

    root = tmp_path_factory.mktemp("entities")
    home = customer_store(root, feature_values(np.arange(1, 101, dtype=np.int64)))

    class Weighted(torch.nn.Module):  # a visible function of the features: x @ WEIGHTS
        def forward(self, x):
            return x @ torch.tensor(WEIGHTS).reshape(N_FEATURES, 1)

    buffer = io.BytesIO()
    torch.jit.save(torch.jit.trace(Weighted(), torch.zeros(2, N_FEATURES)), buffer)
    packages = {}
    for policy in ("error", "default"):
        manifest = {
            "name": f"scorer_{policy}", "platform": "torchscript", "model_file": "model.pt",
            "inputs": [{"name": "input__0", "datatype": "FP32", "shape": [-1, N_FEATURES]}],
            "outputs": [{"name": "output__0", "datatype": "FP32", "shape": [-1, 1]}],
            "max_batch_size": 32,
            "metadata": {"feature_service": "scoring", "unknown_entity": policy},
        }
        packages[policy] = root / policy
        write_package(packages[policy], manifest, {"model.pt": buffer.getvalue()})
    return home, packages
