"""`vivace serve NAME@ALIAS`: served through the registry, following the alias under load.

A load thread keeps requests flowing over keep-alive connections while the alias is moved
to version 2 and rolled back to version 1; every request must succeed, and the versions in
the responses must follow the alias.
"""
from __future__ import annotations

import http.client
import io
import json
import subprocess
import sys
import threading
import time

import pytest

from conftest import ServerProcess

BODY = json.dumps({"inputs": [{"name": "input__0", "shape": [1, 32], "datatype": "FP32", "data": [0.1] * 32}]})


def cli(home, *args):
    result = subprocess.run([sys.executable, "-m", "vivace.cli", "--home", str(home), *map(str, args)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def registry_home(tmp_path_factory, mlp_package):
    import torch

    from vivace.registry.package import load_package, write_package

    home = tmp_path_factory.mktemp("home")
    cli(home, "models", "register", mlp_package, "--name", "churn")
    # Version 2: same signature, a different model (answers the first feature, squashed).
    class Other(torch.nn.Module):
        def forward(self, x):
            return torch.sigmoid(x[:, :1])

    buffer = io.BytesIO()
    torch.jit.save(torch.jit.trace(Other(), torch.zeros(2, 32)), buffer)
    other = tmp_path_factory.mktemp("other") / "pkg"
    write_package(other, load_package(mlp_package).manifest(), {"model.pt": buffer.getvalue()})
    cli(home, "models", "register", other, "--name", "churn")
    cli(home, "models", "alias", "churn", "1", "production")
    return home


def test_alias_moves_under_load_without_failed_requests(registry_home):
    server = ServerProcess(["churn@production"], "--follow-interval", "0.1", env={"VIVACE_HOME": str(registry_home)})
    seen: list[str] = []
    failures: list[object] = []
    stop = threading.Event()

    def load():
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        while not stop.is_set():
            try:
                conn.request("POST", "/v2/models/churn/infer", BODY)
                response = conn.getresponse()
                data = response.read()
                if response.status != 200:
                    failures.append((response.status, data))
                else:
                    seen.append(json.loads(data)["model_version"])
            except OSError as exc:
                failures.append(exc)
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)

    threads = [threading.Thread(target=load) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        time.sleep(1.0)
        cli(registry_home, "models", "alias", "churn", "2", "production")
        deadline = time.monotonic() + 20
        while (not seen or seen[-1] != "2") and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        cli(registry_home, "models", "alias", "churn", "1", "production")  # roll back
        deadline = time.monotonic() + 20
        while seen[-1] != "1" and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        assert server.stop() == 0
    assert failures == []
    switches = [v for i, v in enumerate(seen) if i == 0 or seen[i - 1] != v]
    assert switches[0] == "1" and "2" in switches and seen[-1] == "1", switches
    assert len(seen) > 100


def test_unknown_alias_is_a_clear_error(registry_home):
    result = subprocess.run([sys.executable, "-m", "vivace.cli", "--home", str(registry_home),
                             "serve", "churn@nope", "--port", "1"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "nope" in result.stderr and "Traceback" not in result.stderr
