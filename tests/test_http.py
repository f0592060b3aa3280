"""The KServe v2 front end over real loopback HTTP: a `vivace serve` subprocess serving the
reference model, driven by tritonclient, http.client and raw sockets."""
from __future__ import annotations

import http.client
import json
import signal
import socket
import threading
import time

import numpy as np
import pytest

from conftest import ServerProcess, slow_model_bytes

ROW = [round(0.01 * i, 2) for i in range(32)]


def reference_scores(x: np.ndarray) -> np.ndarray:
    from vivace.registry.reference_model import reference_module
    import torch

    with torch.inference_mode():
        return reference_module()(torch.from_numpy(x)).numpy()


def request(server, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data, response


def infer_body(rows=1, **extra):
    body = {"inputs": [{"name": "input__0", "shape": [rows, 32], "datatype": "FP32", "data": ROW * rows}]}
    body.update(extra)
    return json.dumps(body)


def raw_exchange(server, payload: bytes, read_timeout=5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=read_timeout) as s:
        s.sendall(payload)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except socket.timeout:
            pass
    return b"".join(chunks)


# -- health, metadata, config --------------------------------------------------------------

def test_health_and_server_metadata(server):
    assert request(server, "GET", "/v2/health/live")[0] == 200
    assert request(server, "GET", "/v2/health/ready")[0] == 200
    status, body, _ = request(server, "GET", "/v2")
    meta = json.loads(body)
    assert status == 200 and meta["name"] == "vivace" and "binary_tensor_data" in meta["extensions"]


def test_model_metadata_ready_and_config(server):
    status, body, _ = request(server, "GET", "/v2/models/mlp")
    meta = json.loads(body)
    assert status == 200
    assert meta["inputs"] == [{"name": "input__0", "datatype": "FP32", "shape": [-1, 32]}]
    assert meta["outputs"] == [{"name": "output__0", "datatype": "FP32", "shape": [-1, 1]}]
    assert request(server, "GET", "/v2/models/mlp/versions/1/ready")[0] == 200
    config = json.loads(request(server, "GET", "/v2/models/mlp/config")[1])
    assert config["max_batch_size"] == 128
    assert config["input"][0] == {"name": "input__0", "data_type": "TYPE_FP32", "dims": [32]}
    assert "dynamic_batching" in config


def test_unknown_model_version_and_route_are_404(server):
    for path in ("/v2/models/nope", "/v2/models/mlp/versions/9", "/v2/models/mlp/versions/9/infer", "/v3", "/v2/x"):
        status, body, _ = request(server, "GET" if not path.endswith("infer") else "POST", path, body="{}")
        assert status == 404, path
        assert "error" in json.loads(body)
    status, body, response = request(server, "GET", "/v2/models/mlp/infer")
    assert status == 405 and "POST" in json.loads(body)["error"] and response.getheader("allow") == "POST"


# -- inference -----------------------------------------------------------------------------

def test_json_infer_matches_the_torch_model_and_echoes_id(server):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 32)).astype(np.float32)
    body = {"id": "req-7", "inputs": [{"name": "input__0", "shape": [5, 32], "datatype": "FP32",
                                       "data": x.tolist()}]}
    status, data, response = request(server, "POST", "/v2/models/mlp/infer", json.dumps(body))
    assert status == 200, data
    result = json.loads(data)
    assert result["id"] == "req-7"
    assert result["model_name"] == "mlp" and result["model_version"] == "1"
    out = result["outputs"][0]
    assert out["name"] == "output__0" and out["shape"] == [5, 1] and out["datatype"] == "FP32"
    np.testing.assert_allclose(np.array(out["data"]).reshape(5, 1), reference_scores(x), atol=1e-5)


def test_rows_beyond_max_batch_size_are_split(server):
    x = np.random.default_rng(1).standard_normal((300, 32)).astype(np.float32)
    body = {"inputs": [{"name": "input__0", "shape": [300, 32], "datatype": "FP32", "data": x.ravel().tolist()}]}
    status, data, _ = request(server, "POST", "/v2/models/mlp/versions/1/infer", json.dumps(body))
    assert status == 200
    out = np.array(json.loads(data)["outputs"][0]["data"], np.float32).reshape(300, 1)
    np.testing.assert_allclose(out, reference_scores(x), atol=1e-5)


def test_tritonclient_json_and_binary(server):
    import tritonclient.http as triton

    client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    assert client.is_server_live() and client.is_model_ready("mlp")
    assert client.get_model_metadata("mlp")["inputs"][0]["name"] == "input__0"
    assert client.get_model_config("mlp")["max_batch_size"] == 128
    x = np.random.default_rng(2).standard_normal((3, 32)).astype(np.float32)
    expected = reference_scores(x)
    for binary in (False, True):
        inp = triton.InferInput("input__0", [3, 32], "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        out = triton.InferRequestedOutput("output__0", binary_data=binary)
        result = client.infer("mlp", [inp], outputs=[out], request_id=f"tc-{binary}")
        np.testing.assert_allclose(result.as_numpy("output__0"), expected, atol=1e-5)
        assert result.get_response()["id"] == f"tc-{binary}"
    # No outputs named: all outputs, binary by default as tritonclient asks.
    inp = triton.InferInput("input__0", [3, 32], "FP32")
    inp.set_data_from_numpy(x)
    np.testing.assert_allclose(client.infer("mlp", [inp]).as_numpy("output__0"), expected, atol=1e-5)
    stats = client.get_inference_statistics("mlp")["model_stats"][0]
    assert stats["inference_count"] >= 6 and stats["execution_count"] >= 1
    client.close()


def test_binary_request_with_json_output(server):
    x = np.ones((2, 32), np.float32)
    header = json.dumps({"inputs": [{"name": "input__0", "shape": [2, 32], "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    status, data, response = request(server, "POST", "/v2/models/mlp/infer", header + x.tobytes(),
                                     {"Inference-Header-Content-Length": str(len(header))})
    assert status == 200
    np.testing.assert_allclose(np.array(json.loads(data)["outputs"][0]["data"]).reshape(2, 1),
                               reference_scores(x), atol=1e-5)


def test_binary_output_layout(server):
    x = np.zeros((4, 32), np.float32)
    body = infer_body(4, outputs=[{"name": "output__0", "parameters": {"binary_data": True}}])
    body = json.loads(body)
    body["inputs"][0]["data"] = x.ravel().tolist()
    status, data, response = request(server, "POST", "/v2/models/mlp/infer", json.dumps(body))
    assert status == 200
    header_length = int(response.getheader("Inference-Header-Content-Length"))
    header = json.loads(data[:header_length])
    assert header["outputs"][0]["parameters"]["binary_data_size"] == 16
    np.testing.assert_allclose(np.frombuffer(data[header_length:], np.float32).reshape(4, 1),
                               reference_scores(x), atol=1e-5)


def test_keep_alive_and_pipelined_requests_answer_in_order(server):
    requests = []
    for i in range(20):
        if i % 3 == 0:
            requests.append(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        else:
            body = infer_body(1 + i % 4, id=f"p{i}").encode()
            requests.append(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                            % (len(body), body))
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"".join(requests))
        buffer = b""
        answers = []
        while len(answers) < 20:
            chunk = s.recv(65536)
            assert chunk, "connection closed early"
            buffer += chunk
            while b"\r\n\r\n" in buffer:
                head, rest = buffer.split(b"\r\n\r\n", 1)
                length = int([line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")][0])
                if len(rest) < length:
                    break
                answers.append(rest[:length])
                buffer = rest[length:]
    for i, answer in enumerate(answers):
        if i % 3 == 0:
            assert answer == b'{"live":true}'
        else:
            result = json.loads(answer)
            assert result["id"] == f"p{i}" and result["outputs"][0]["shape"] == [1 + i % 4, 1]


# -- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize(
    "body,message",
    [
        (b'{"inputs": [', "malformed JSON"),
        (b"not json at all", "malformed JSON"),
        (b'{"inputs": "x"}', "invalid inference request"),
        (b'{}', "invalid inference request"),
        (infer_body().replace('"FP32"', '"INT32"').encode(), "datatype"),
        (infer_body().replace("[1, 32]", "[1, 31]").encode(), "shape"),
        (infer_body().replace("[1, 32]", "[2, 32]").encode(), "elements"),
        (infer_body().replace("input__0", "bogus").encode(), "unknown input"),
        (b'{"inputs": []}', "missing inputs"),
        (json.dumps({"inputs": [{"name": "input__0", "shape": [1, 32], "datatype": "FP32", "data": ["a"] * 32}]}).encode(),
         "non-numeric"),
        (json.dumps({"inputs": [{"name": "input__0", "shape": [1, 32], "datatype": "FP32"}]}).encode(), "no data"),
        (infer_body(outputs=[{"name": "nope"}]).encode(), "unknown output"),
        (json.dumps({"inputs": [{"name": "input__0", "shape": [1, 32], "datatype": "FP32", "data": ROW},
                                {"name": "input__0", "shape": [1, 32], "datatype": "FP32", "data": ROW}]}).encode(),
         "more than once"),
        (infer_body(parameters={"priority": 7}).encode(), "priority"),
        (infer_body(parameters={"timeout": -1}).encode(), "timeout"),
    ],
)
def test_bad_infer_requests_get_400_with_a_reason(server, body, message):
    status, data, _ = request(server, "POST", "/v2/models/mlp/infer", body)
    assert status == 400, data
    assert message in json.loads(data)["error"]


@pytest.mark.parametrize(
    "declared,actual,header_extra,message",
    [
        (128, 127, 0, "truncated"),
        (128, 130, 0, "beyond"),
        (100, 100, 0, "does not match"),
        (128, 128, 10_000, "outside the body"),
    ],
)
def test_binary_lengths_that_disagree_are_refused(server, declared, actual, header_extra, message):
    header = json.dumps({"inputs": [{"name": "input__0", "shape": [1, 32], "datatype": "FP32",
                                     "parameters": {"binary_data_size": declared}}]}).encode()
    status, data, _ = request(server, "POST", "/v2/models/mlp/infer", header + b"\x00" * actual,
                              {"Inference-Header-Content-Length": str(len(header) + header_extra)})
    assert status == 400
    assert message in json.loads(data)["error"]


def test_binary_data_without_header_length_is_refused(server):
    body = json.dumps({"inputs": [{"name": "input__0", "shape": [1, 32], "datatype": "FP32",
                                   "parameters": {"binary_data_size": 128}}]})
    status, data, _ = request(server, "POST", "/v2/models/mlp/infer", body)
    assert status == 400 and "Inference-Header-Content-Length" in json.loads(data)["error"]


def test_body_over_the_limit_is_413(server):
    big = b"x" * ((1 << 20) + 10)
    reply = raw_exchange(server, b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                         % len(big))
    assert reply.startswith(b"HTTP/1.1 413")
    # Chunked bodies are counted as they arrive.
    chunk = b"%x\r\n%s\r\n" % (1 << 19, b"y" * (1 << 19))
    reply = raw_exchange(server, b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                         + chunk * 3)
    assert reply.startswith(b"HTTP/1.1 413")


def test_header_flood_is_431(server):
    headers = b"".join(b"X-Flood-%d: %s\r\n" % (i, b"v" * 100) for i in range(2000))
    reply = raw_exchange(server, b"GET /v2 HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    assert reply.startswith(b"HTTP/1.1 431")


def test_malformed_http_is_400_and_closes(server):
    reply = raw_exchange(server, b"BREW /pot HTCPCP/1.0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400")


def test_slow_headers_and_slow_body_time_out(server):
    # The fixture's server uses 1 s header and body timeouts.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"GET /v2 HTTP/1.1\r\nHost: x\r\n")  # never finishes the headers
        reply = s.recv(65536)
    assert reply.startswith(b"HTTP/1.1 408")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        reply = s.recv(65536)
    assert reply.startswith(b"HTTP/1.1 408")


def test_client_disconnect_while_queued_leaves_server_healthy(server):
    body = infer_body(100).encode()
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        s.close()
    status, data, _ = request(server, "POST", "/v2/models/mlp/infer", infer_body())
    assert status == 200


def test_ten_thousand_garbage_requests_then_a_valid_one(server):
    garbage = b'{"inputs": [{"name": "input__0", "shape": [1, 32], "datatype": "FP32", "data": [1, 2'
    one = b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(garbage), garbage)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        reader = threading.Thread(target=lambda: _drain_socket(s, 10_000), daemon=True)
        reader.start()
        for _ in range(100):
            s.sendall(one * 100)
        reader.join(60)
    status, data, _ = request(server, "POST", "/v2/models/mlp/infer", infer_body())
    assert status == 200 and json.loads(data)["outputs"][0]["shape"] == [1, 1]


def _drain_socket(s, responses):
    seen = 0
    while seen < responses:
        chunk = s.recv(1 << 20)
        if not chunk:
            return
        seen += chunk.count(b"HTTP/1.1 400")


# -- metrics -------------------------------------------------------------------------------

def test_metrics_exposes_counters_and_histograms(server):
    request(server, "POST", "/v2/models/mlp/infer", infer_body())
    request(server, "POST", "/v2/models/mlp/infer", b"{bad")
    status, data, response = request(server, "GET", "/metrics")
    text = data.decode()
    assert status == 200 and response.getheader("Content-Type").startswith("text/plain")
    for name in ("vivace_request_success_total", "vivace_request_duration_seconds_bucket",
                 "vivace_queue_duration_seconds_bucket", "vivace_batch_size_bucket",
                 "vivace_inference_count_total", "vivace_execution_count_total", "vivace_process_cpu_seconds_total"):
        assert f"{name}{{" in text or f"{name} " in text, name
    assert 'vivace_request_failure_total{model="mlp",reason="bad_request",version="1"}' in text


# -- lifecycle -----------------------------------------------------------------------------

def test_sigterm_drains_accepted_requests_and_refuses_new_connections(mlp_package, tmp_path):
    from vivace.registry.package import load_package, write_package

    # A model that takes ~0.5 s per batch, so requests are in flight when SIGTERM lands.
    slow_dir = tmp_path / "slow"
    package = load_package(mlp_package)
    manifest = package.manifest()
    manifest.update(name="slow", parameters={"torch_num_threads": 1})
    write_package(slow_dir, manifest, {"model.pt": slow_model_bytes(40)})
    srv = ServerProcess([slow_dir])
    results = []

    def call():
        try:
            results.append(request(srv, "POST", "/v2/models/slow/infer", infer_body())[0])
        except OSError as exc:
            results.append(exc)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    srv.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(30)
    assert results == [200, 200, 200, 200]
    assert srv.proc.wait(30) == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", srv.port), timeout=2).close()


def test_header_limits_are_configurable(mlp_package):
    server = ServerProcess([mlp_package], "--max-headers", "4", "--max-header-bytes", "300")
    try:
        few = b"".join(b"X-%d: v\r\n" % i for i in range(2))
        reply = raw_exchange(server, b"GET /v2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + few + b"\r\n")
        assert reply.startswith(b"HTTP/1.1 200")
        many = b"".join(b"X-%d: v\r\n" % i for i in range(5))
        assert raw_exchange(server, b"GET /v2 HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n").startswith(b"HTTP/1.1 431")
        long = b"X-Long: " + b"v" * 400 + b"\r\n"
        assert raw_exchange(server, b"GET /v2 HTTP/1.1\r\nHost: x\r\n" + long + b"\r\n").startswith(b"HTTP/1.1 431")
    finally:
        assert server.stop() == 0


# -- request targets, refusals, first-request timeout (issue 12 items 3, 6, 7) ------------

def test_absolute_form_targets_are_routed_by_path(server):
    # RFC 9112 3.2.2: a server must accept the absolute form (what proxies send).
    url = f"http://127.0.0.1:{server.port}"
    status, data, _ = request(server, "POST", url + "/v2/models/mlp/infer", infer_body(id="abs"))
    assert status == 200 and json.loads(data)["id"] == "abs"
    answer = raw_exchange(server, b"GET HTTP://example:1/v2/health/live?x=1 HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    for target in (b"http:///v2/health/live", b"http://host?q"):  # no host, no path
        answer = raw_exchange(server, b"GET %s HTTP/1.1\r\n\r\n" % target)
        assert answer.startswith(b"HTTP/1.1 400 "), answer


def test_every_503_carries_retry_after():
    from vivace.engine.http import http_response

    for extra in (b"", b"x-other: 1\r\n"):
        assert b"\r\nretry-after: 1\r\n" in http_response(503, b"{}", extra=extra)
    assert http_response(503, b"{}", extra=b"Retry-After: 7\r\n").lower().count(b"retry-after") == 1
    assert b"retry-after" not in http_response(500, b"{}")


def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(server):
    # The server runs with --header-timeout 1 and the default --idle-timeout of 75 s.
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        try:
            assert s.recv(4096) == b""
        except ConnectionResetError:
            pass
