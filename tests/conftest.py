"""Shared fixtures: the reference model package and a real `vivace serve` on loopback."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

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
