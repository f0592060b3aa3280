"""Backend faults fail only their own batch: a model that raises, returns the wrong shape
or hangs gets a 500 naming it, and the server and its other models keep serving.

The faulty model is a real TorchScript module whose first feature picks the fault:
0 healthy, 1 raises, 2 returns the wrong shape, 3 computes for a few seconds (a hang
longer than the server's execution timeout).
"""
from __future__ import annotations

import http.client
import io
import json
import threading
import time

import pytest

from conftest import ServerProcess

HEALTHY, RAISES, WRONG_SHAPE, HANGS = 0, 1, 2, 3


def body(mode: int, spin: int = 0) -> str:
    row = [float(mode), float(spin)] + [0.1] * 30
    return json.dumps({"inputs": [{"name": "input__0", "shape": [1, 32], "datatype": "FP32", "data": row}]})


def post(server, model: str, payload: str) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", f"/v2/models/{model}/infer", body=payload)
    response = conn.getresponse()
    data = json.loads(response.read())
    conn.close()
    return response.status, data


def get_status(server, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", path)
    response = conn.getresponse()
    response.read()
    conn.close()
    return response.status


@pytest.fixture(scope="module")
def faulty_package(tmp_path_factory, mlp_package):
    import torch

    from vivace.registry.package import load_package, write_package

    class Faulty(torch.nn.Module):
        def forward(self, x):
            mode = int(x[0, 0].item())
            if mode == 1:
                raise RuntimeError("injected failure")
            if mode == 2:
                return torch.zeros(x.shape[0], 3)
            if mode == 3:
                a = torch.ones(64, 64)
                for _ in range(int(x[0, 1].item())):
                    a = torch.tanh(a @ a / 64.0)
                return torch.sigmoid(x[:, :1] + a[0, :1])
            return torch.sigmoid(x[:, :1])

    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(Faulty()), buffer)
    manifest = load_package(mlp_package).manifest()
    manifest["name"] = "faulty"
    path = tmp_path_factory.mktemp("faulty") / "faulty"
    write_package(path, manifest, {"model.pt": buffer.getvalue()})
    return path


@pytest.fixture(scope="module")
def server(faulty_package, mlp_package):
    srv = ServerProcess([faulty_package, mlp_package], "--execution", "threads", "--execution-timeout", "1",
                        "--threads", "1")
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def spin(server) -> int:
    """Iterations of the "hang" that take about four seconds in this server, on this machine."""
    probe = 300
    for _ in range(3):  # the first calls of a scripted module profile and optimise it
        start = time.monotonic()
        post(server, "faulty", body(HANGS, probe))
        took = time.monotonic() - start
    return int(probe * 4.0 / took)


def test_a_raising_backend_fails_only_its_batch(server):
    status, data = post(server, "faulty", body(RAISES))
    assert status == 500 and "'faulty'" in data["error"] and "injected failure" in data["error"]
    assert post(server, "faulty", body(HEALTHY))[0] == 200
    assert post(server, "mlp", body(HEALTHY))[0] == 200


def test_a_wrong_output_shape_is_a_500_naming_the_model(server):
    status, data = post(server, "faulty", body(WRONG_SHAPE))
    assert status == 500 and "'faulty'" in data["error"] and "shape (1, 3)" in data["error"]
    assert post(server, "faulty", body(HEALTHY))[0] == 200


def test_a_hung_backend_is_failed_by_the_watchdog_and_others_keep_serving(server, spin):
    status, data = post(server, "faulty", body(HANGS, spin))
    assert status == 500 and "execution timeout" in data["error"] and "'faulty'" in data["error"]
    # The model is out of service while its batch still runs; the other model is not.
    assert get_status(server, "/v2/models/faulty/ready") == 503
    status, data = post(server, "faulty", body(HEALTHY))
    assert status == 503 and "longer than" in data["error"]
    assert post(server, "mlp", body(HEALTHY))[0] == 200
    assert get_status(server, "/v2/health/live") == 200
    assert get_status(server, "/v2/health/ready") == 200  # the server still serves its other models
    deadline = time.monotonic() + 60
    while get_status(server, "/v2/models/faulty/ready") != 200:  # back once the batch returned
        assert time.monotonic() < deadline, "model never came back after the overrunning batch"
        time.sleep(0.1)
    assert post(server, "faulty", body(HEALTHY))[0] == 200


def test_requests_queued_behind_a_hung_batch_are_answered(server, spin):
    answers: list[int] = []

    def send(payload: str) -> None:
        answers.append(post(server, "faulty", payload)[0])

    hung = threading.Thread(target=send, args=(body(HANGS, spin),))
    hung.start()
    time.sleep(0.2)  # the hanging batch is running: these queue behind it
    queued = [threading.Thread(target=send, args=(body(HEALTHY),)) for _ in range(3)]
    for t in queued:
        t.start()
    for t in [hung, *queued]:
        t.join(timeout=60)
    assert len(answers) == 4 and all(status in (500, 503) for status in answers)
    deadline = time.monotonic() + 60
    while post(server, "faulty", body(HEALTHY))[0] != 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_a_worker_whose_loop_is_blocked_is_killed_and_restarted(faulty_package, spin):
    """Inline execution runs batches on the event loop: a hanging backend blocks the whole
    worker. With --workers, the supervisor sees its heartbeat stop and restarts it."""
    server = ServerProcess([faulty_package], "--workers", "2", "--execution", "inline", "--execution-timeout", "1",
                           "--threads", "1")
    try:
        try:
            status = post(server, "faulty", body(HANGS, spin * 4))[0]
        except (ConnectionError, http.client.HTTPException):
            status = None  # the worker was killed under the request
        assert status is None
        deadline = time.monotonic() + 60
        answered = 0
        while answered < 10:  # every new request is answered again (by a healthy or restarted worker)
            assert time.monotonic() < deadline, "the server did not recover from a blocked worker"
            try:
                answered += post(server, "faulty", body(HEALTHY))[0] == 200
            except (ConnectionError, http.client.HTTPException):
                time.sleep(0.1)
    finally:
        code = server.stop()
    log = server.proc.stderr.read().decode()
    assert code == 0, log[-3000:]
    assert "event loop has been blocked" in log and "restarting" in log


@pytest.fixture(scope="module")
def misdeclared_package(tmp_path_factory, mlp_package):
    """Declares output [-1, 2] but always returns 3 columns: every request would fail."""
    import torch

    from vivace.registry.package import load_package, write_package

    class ThreeColumns(torch.nn.Module):
        def forward(self, x):
            return torch.sigmoid(x[:, :3])

    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(ThreeColumns()), buffer)
    manifest = load_package(mlp_package).manifest()
    manifest["name"] = "misdeclared"
    manifest["outputs"][0]["shape"] = [-1, 2]
    path = tmp_path_factory.mktemp("misdeclared") / "misdeclared"
    write_package(path, manifest, {"model.pt": buffer.getvalue()})
    return path


def test_serving_only_a_model_that_fails_warm_up_exits_with_the_reason(misdeclared_package):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "vivace", "serve", str(misdeclared_package), "--port", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "'misdeclared'" in result.stderr and "failed warm-up" in result.stderr
    assert "shape (1, 3), expected (1, 2)" in result.stderr


def test_a_model_that_fails_warm_up_is_unavailable_and_the_others_serve(misdeclared_package, mlp_package):
    srv = ServerProcess([misdeclared_package, mlp_package])
    try:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
        conn.request("POST", "/v2/repository/index", body=b"")
        index = {m["name"]: m for m in json.loads(conn.getresponse().read())}
        conn.close()
        assert index["misdeclared"]["state"] == "UNAVAILABLE"
        assert "failed warm-up" in index["misdeclared"]["reason"]
        assert index["mlp"]["state"] == "READY"
        assert get_status(srv, "/v2/models/misdeclared/ready") == 503
        status, data = post(srv, "misdeclared", body(HEALTHY))
        assert status == 503 and "failed warm-up" in data["error"]
        assert post(srv, "mlp", body(HEALTHY))[0] == 200
        assert get_status(srv, "/v2/health/ready") == 200  # the healthy model keeps the server ready
    finally:
        assert srv.stop() == 0
