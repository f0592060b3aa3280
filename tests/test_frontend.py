"""The native HTTP/1.1 front end (csrc/frontend/) under real `vivace serve` processes:
pipelined mixes of natively answered and forwarded requests, chunked bodies, framing that
could smuggle a request, byte-by-byte clients, clients that go away, connection limits,
metrics of native refusals and SIGTERM drain. Raw sockets throughout: the point is the
bytes on the wire. The reference model is served twice: `mlp` (torch, its batches run by
the Python loop) and `nmlp` (the native kernel, its batches run by the front end's own
thread).
"""
from __future__ import annotations

import json
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import ServerProcess, slow_model_bytes, wait_for

ROW = [round(0.01 * i, 2) for i in range(32)]
BODY_LIMIT = 1 << 16


def infer_body(rows: int = 1, **extra) -> bytes:
    body = {"inputs": [{"name": "input__0", "shape": [rows, 32], "datatype": "FP32", "data": ROW * rows}]}
    body.update(extra)
    return json.dumps(body).encode()


def post(target: str, body: bytes, headers: bytes = b"") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n%s\r\n%s" % (
        target.encode(), len(body), headers, body)


def get(target: str, headers: bytes = b"") -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: x\r\n%s\r\n" % (target.encode(), headers)


def chunked(target: str, chunks: bytes, headers: bytes = b"") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n%s\r\n%s" % (
        target.encode(), headers, chunks)


def encode_chunks(body: bytes, size: int, extension: bytes = b"") -> bytes:
    pieces = [body[i:i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x%s\r\n%s\r\n" % (len(piece), extension, piece) for piece in pieces) + b"0\r\n\r\n"


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"Response({self.status}, {self.body[:200]!r})"


class Reader:
    """Reads HTTP/1.1 responses (Content-Length framed, as the server sends them) off a socket."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = b""

    def _fill(self) -> bool:
        chunk = self.sock.recv(1 << 20)
        self.buffer += chunk
        return bool(chunk)

    def next(self) -> Response | None:
        """The next final response (100 Continue skipped), or None at end of stream."""
        while True:
            while b"\r\n\r\n" not in self.buffer:
                if not self._fill():
                    assert not self.buffer, f"stream ended inside a response head: {self.buffer[:200]!r}"
                    return None
            head, rest = self.buffer.split(b"\r\n\r\n", 1)
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ")[1])
            headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
            length = int(headers.get("content-length", "0"))
            while len(rest) < length:
                assert self._fill(), "stream ended inside a response body"
                rest = self.buffer.split(b"\r\n\r\n", 1)[1]
            self.buffer = rest[length:]
            if status != 100:
                return Response(status, headers, rest[:length])

    def at_eof(self) -> bool:
        """True when the server closed the connection with nothing more to read."""
        return not self.buffer and not self._fill()


def connect(server, timeout: float = 10.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def exchange(server, payload: bytes, count: int) -> tuple[list[Response], bool]:
    """Send `payload` on a new connection; read `count` responses, then whether the
    server closed the connection (rather than waiting for more requests)."""
    with connect(server, timeout=5) as s:
        s.sendall(payload)
        reader = Reader(s)
        responses = [reader.next() for _ in range(count)]
        s.settimeout(0.5)  # a refused connection is closed at once
        try:
            closed = reader.at_eof()
        except socket.timeout:
            closed = False
    return responses, closed


def reference(x: np.ndarray) -> np.ndarray:
    import torch

    from vivace.registry.reference_model import reference_module

    with torch.inference_mode():
        return reference_module()(torch.from_numpy(x)).numpy()


def reference_scores(rows: int) -> np.ndarray:
    return reference(np.array([ROW] * rows, np.float32))


def scores(response: Response) -> np.ndarray:
    assert response.status == 200, response
    out = response.json()["outputs"][0]
    return np.array(out["data"], np.float32).reshape(out["shape"])


def metric(server, name: str, labels: str = "") -> float:
    with connect(server) as s:
        s.sendall(get("/metrics"))
        text = Reader(s).next().body.decode()
    match = re.search(r"^%s%s (\S+)$" % (re.escape(name), re.escape("{%s}" % labels if labels else "")), text, re.M)
    return float(match.group(1)) if match else 0.0


# -- servers -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def native_package(mlp_package, tmp_path_factory):
    """The reference model for the native kernel, named nmlp: inline batches that the front
    end's thread runs itself."""
    from vivace.engine.native.convert import quantize_package
    from vivace.registry.package import load_package, write_package

    converted = tmp_path_factory.mktemp("native") / "converted"
    quantize_package(mlp_package, converted, precision="fp32")
    package = load_package(converted)
    manifest = package.manifest()
    manifest.pop("files", None)
    manifest.update(name="nmlp", version="1")
    path = tmp_path_factory.mktemp("native") / "nmlp"
    write_package(path, manifest, {package.model_file: (converted / package.model_file).read_bytes()})
    return path


@pytest.fixture(scope="module")
def server(mlp_package, native_package):
    srv = ServerProcess([mlp_package, native_package], "--http-frontend", "native", "--max-body-bytes",
                        str(BODY_LIMIT), "--header-timeout", "1", "--body-timeout", "1", "--max-connections", "32")
    yield srv
    assert srv.stop() == 0


def _slow_package(mlp_package, directory, name: str, timeout_us: int = 0):
    """A model spending ~0.3 s per batch of at most one row: requests wait in its queue."""
    from vivace.registry.package import load_package, write_package

    manifest = load_package(mlp_package).manifest()
    manifest.pop("files", None)
    manifest.update(name=name, max_batch_size=1, parameters={"torch_num_threads": 1})
    manifest["dynamic_batching"]["default_queue_policy"]["default_timeout_microseconds"] = timeout_us
    write_package(directory / name, manifest, {"model.pt": slow_model_bytes(100)})
    return directory / name


@pytest.fixture(scope="module")
def slow_models(mlp_package, tmp_path_factory):
    directory = tmp_path_factory.mktemp("slow")
    return [_slow_package(mlp_package, directory, "slow"),
            _slow_package(mlp_package, directory, "slowt", timeout_us=50_000)]


# -- pipelining ----------------------------------------------------------------------------

def _mixed_requests() -> list[tuple[bytes, object]]:
    """(request bytes, check(response)) covering the native path (both models), every kind
    of forwarded request, and errors answered natively and by Python."""
    binary = np.ones((2, 32), np.float32)
    header = json.dumps({"inputs": [{"name": "input__0", "shape": [2, 32], "datatype": "FP32",
                                     "parameters": {"binary_data_size": binary.nbytes}}]}).encode()
    expected1, expected2, expected3 = reference_scores(1), reference_scores(2), reference_scores(3)

    def fast(rows, expected, model="mlp", id_=None):
        def check(r):
            np.testing.assert_allclose(scores(r), expected, atol=1e-5)
            assert r.json()["model_name"] == model
            if id_:
                assert r.json()["id"] == id_
        extra = {"id": id_} if id_ else {}
        return post(f"/v2/models/{model}/infer", infer_body(rows, **extra)), check

    def body_has(text):
        def check(r):
            assert r.status == 200 and text in r.body, r
        return check

    def status(code, text=""):
        def check(r):
            assert r.status == code, r
            if code >= 400:
                assert text in r.json()["error"], r
        return check

    expected_binary = reference(binary)

    def binary_check(r):
        np.testing.assert_allclose(scores(r), expected_binary, atol=1e-5)

    return [
        fast(1, expected1, id_="a"),
        fast(3, expected3, model="nmlp", id_="b"),
        (get("/v2/models/mlp"), body_has(b'"name":"input__0"')),
        (get("/metrics"), body_has(b"vivace_request_success_total")),
        fast(2, expected2, model="nmlp"),
        (post("/v2/models/mlp/infer", header + binary.tobytes(), b"Inference-Header-Content-Length: %d\r\n"
              % len(header)), binary_check),
        (post("/v2/models/mlp/infer", b'{"inputs": ['), status(400, "malformed JSON")),
        (post("/v2/models/nmlp/infer", infer_body().replace(b"[1, 32]", b"[2, 32]")), status(400, "elements")),
        (post("/v2/models/nope/infer", infer_body()), status(404, "unknown model")),
        (get("/v2/models/nmlp/versions/1/ready"), status(200)),
        (chunked("/v2/models/nmlp/versions/1/infer", encode_chunks(infer_body(2), 50)),
         lambda r: np.testing.assert_allclose(scores(r), expected2, atol=1e-5)),
        (post("/v2/models/mlp/versions/1/infer", infer_body(3), b"Expect: 100-continue\r\n"),
         lambda r: np.testing.assert_allclose(scores(r), expected3, atol=1e-5)),
        fast(1, expected1, model="nmlp", id_="last"),
    ]


def test_pipelined_mix_is_answered_in_order(server):
    mix = _mixed_requests() * 3
    with connect(server) as s:
        s.sendall(b"".join(request for request, _ in mix))
        reader = Reader(s)
        for i, (_, check) in enumerate(mix):
            response = reader.next()
            assert response is not None, f"connection closed before response {i}"
            check(response)
        s.sendall(get("/v2/health/live"))  # still open and in sync after the mix
        assert reader.next().body == b'{"live":true}'


def test_requests_split_byte_by_byte(server):
    mix = _mixed_requests()
    payload = b"".join(request for request, _ in mix)
    with connect(server) as s:
        responses: list = []
        reader = Reader(s)
        thread = threading.Thread(target=lambda: responses.extend(reader.next() for _ in mix), daemon=True)
        thread.start()
        for i in range(len(payload)):
            s.send(payload[i:i + 1])
        thread.join(30)
    assert len(responses) == len(mix)
    for response, (_, check) in zip(responses, mix):
        check(response)


# -- framing -------------------------------------------------------------------------------

def test_a_burst_of_exactly_64_kib_is_answered(server):
    # The front end reads 64 KiB at a time: a burst that fills its last read exactly must
    # still be parsed when the next read finds nothing.
    one = get("/v2/health/live", b"X-Pad: " + b"p" * 1000 + b"\r\n")
    count = (1 << 16) // len(one)
    last_pad = (1 << 16) - len(one) * (count - 1) - len(get("/v2/health/live", b"X-Pad: \r\n"))
    payload = one * (count - 1) + get("/v2/health/live", b"X-Pad: " + b"p" * last_pad + b"\r\n")
    assert len(payload) == 1 << 16
    for _ in range(3):
        with connect(server, timeout=5) as s:
            s.sendall(payload)
            reader = Reader(s)
            assert all(reader.next().status == 200 for _ in range(count))


def test_chunked_bodies_with_extensions_and_trailers(server):
    body = infer_body(2, id="chunky")
    payload = (chunked("/v2/models/mlp/infer", encode_chunks(body, 7, b";name=value;flag"))
               + chunked("/v2/models/nmlp/infer",
                         encode_chunks(body, 1000)[:-2] + b"X-Trailer: 1\r\nX-Other: two\r\n\r\n")
               + chunked("/v2/models/mlp/infer", b"%X\r\n%s\r\n0\r\n\r\n" % (len(body), body))  # upper-case hex
               + get("/v2/health/live"))
    responses, closed = exchange(server, payload, 4)
    for response in responses[:3]:
        np.testing.assert_allclose(scores(response), reference_scores(2), atol=1e-5)
        assert response.json()["id"] == "chunky"
    assert responses[3].body == b'{"live":true}' and not closed


_SMUGGLE = get("/v2/health/live")  # must never be answered: it hides in a refused body


@pytest.mark.parametrize(
    "payload,status",
    [
        (chunked("/v2/models/mlp/infer", b"zz\r\n" + _SMUGGLE), 400),
        (chunked("/v2/models/mlp/infer", b"3\r\nabcX\r\n0\r\n\r\n" + _SMUGGLE), 400),
        (chunked("/v2/models/mlp/infer", b"\r\n" + _SMUGGLE), 400),
        (chunked("/v2/models/mlp/infer", b"-1\r\n" + _SMUGGLE), 400),
        # A bare LF in an extension: a proxy ending the line there frames the body differently.
        (chunked("/v2/models/mlp/infer", b"3;a\nxyz\r\nabc\r\n0\r\n\r\n" + _SMUGGLE), 400),
        # Digits after the size: "5 1" is not a chunk size.
        (chunked("/v2/models/mlp/infer", b"5 1\r\n" + _SMUGGLE[:5] + b"\r\n0\r\n\r\n"), 400),
        (chunked("/v2/models/mlp/infer", b"0\r\nnot a trailer\r\n\r\n" + _SMUGGLE), 400),
        (chunked("/v2/models/mlp/infer", b"FFFFFFFFFFFFFFFFFFFFFFFF\r\n" + _SMUGGLE), 413),
        (chunked("/v2/models/mlp/infer", b"%x\r\n" % (BODY_LIMIT + 1) + _SMUGGLE), 413),
        (chunked("/v2/models/mlp/infer", b"%x\r\n%s\r\n" % (BODY_LIMIT // 2, b"y" * (BODY_LIMIT // 2)) * 3), 413),
        # Framing conflicts and bad lengths (RFC 9112 6.3): refused, never guessed.
        (post("/v2/models/mlp/infer", b"0\r\n\r\n" + _SMUGGLE, b"Transfer-Encoding: chunked\r\n"), 400),
        (chunked("/v2/models/mlp/infer", b"0\r\n\r\n" + _SMUGGLE, b"Content-Length: 5\r\n"), 400),
        (b"POST /v2/models/mlp/infer HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 40\r\n\r\nabc" + _SMUGGLE, 400),
        (b"POST /v2/models/mlp/infer HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\nabc" + _SMUGGLE, 400),
        (b"POST /v2/models/mlp/infer HTTP/1.1\r\nContent-Length: +3\r\n\r\nabc" + _SMUGGLE, 400),
        (b"POST /v2/models/mlp/infer HTTP/1.1\r\nContent-Length: 0x3\r\n\r\nabc" + _SMUGGLE, 400),
        (b"POST /v2/models/mlp/infer HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (BODY_LIMIT + 1) + _SMUGGLE, 413),
        (b"POST /v2/models/mlp/infer HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n" + _SMUGGLE, 400),
        (b"POST /v2/models/mlp/infer HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
         b"0\r\n\r\n" + _SMUGGLE, 400),
        (b"POST /v2/models/mlp/infer HTTP/1.1\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n" + _SMUGGLE, 400),
        (b"GET /v2 HTTP/1.1\r\nX-Folded: a\r\n b\r\n\r\n" + _SMUGGLE, 400),
        (b"GET /v2 HTTP/1.1\r\nX-A: a\nContent-Length: 5\r\n\r\n" + _SMUGGLE, 400),
    ],
)
def test_bad_framing_is_refused_and_closes(server, payload, status):
    responses, closed = exchange(server, payload, 1)
    response = responses[0]
    assert response.status == status, response
    assert response.headers["connection"] == "close" and response.headers["content-type"] == "application/json"
    assert response.json()["error"]
    assert closed, "the connection must close after a framing error (nothing after it is read)"


def test_bare_lf_is_refused_at_once(server):
    # 400 without waiting for the header timeout (1 s here; the default is 10 s).
    with connect(server, timeout=0.9) as s:
        s.sendall(b"GET /v2/health/live HTTP/1.1\nHost: x\n\n")
        response = Reader(s).next()
    assert response.status == 400 and "LF" in response.json()["error"]


def test_empty_lines_before_a_request_are_ignored(server):
    # RFC 9112 2.2: a server SHOULD ignore at least one empty line before a request line
    # (some clients send CRLF after a POST body); the Python front end does.
    body = infer_body()
    responses, _ = exchange(server, post("/v2/models/nmlp/infer", body) + b"\r\n" + get("/v2/health/live"), 2)
    assert responses[0].status == 200 and responses[1].body == b'{"live":true}'


def test_trailer_flood_is_refused(server):
    # Trailers count against the header limit: without one, they buffer until the body timeout.
    flood = b"".join(b"X-T%d: %s\r\n" % (i, b"v" * 100) for i in range(2000))
    with connect(server, timeout=0.9) as s:
        s.sendall(chunked("/v2/models/mlp/infer", b"0\r\n" + flood))
        response = Reader(s).next()
    assert response.status == 431


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"^VmRSS:\s+(\d+)", f.read(), re.M).group(1))


def test_chunk_overhead_is_not_buffered(server):
    # 20 KiB of body in one-byte chunks, each with a 1000-byte extension: 20 MB on the wire.
    # Decoded chunks must not keep their encoding in memory until the body is complete.
    body = infer_body() + b" " * 20_000
    extension = b";" + b"e" * 1000
    with connect(server) as s:
        s.sendall(post("/v2/models/nmlp/infer", body))  # warm: allocations of a first request
        reader = Reader(s)
        assert reader.next().status == 200
        before = _rss_kib(server.proc.pid)
        s.sendall(chunked("/v2/models/nmlp/infer", encode_chunks(body, 1, extension)))
        response = reader.next()
        grown = _rss_kib(server.proc.pid) - before  # measured while the connection still holds its buffers
    np.testing.assert_allclose(scores(response), reference_scores(1), atol=1e-5)
    assert grown < 10_000, f"the server grew by {grown} KiB for a 20 KiB body"


# -- connections ---------------------------------------------------------------------------

def test_half_closed_client_still_gets_its_answers(server):
    # A client may shut down its sending side once it has sent its requests (nc, shell
    # scripts): what it asked for is still answered, then the connection closes.
    for payload, count in ((get("/v2/health/ready"), 1),
                           (get("/v2/models/mlp") + post("/v2/models/nmlp/infer", infer_body())
                            + get("/v2/health/live", b"Connection: close\r\n"), 3)):
        with connect(server, timeout=5) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            reader = Reader(s)
            responses = [reader.next() for _ in range(count)]
            assert all(r is not None and r.status == 200 for r in responses), responses
            assert reader.at_eof()


def test_h2c_upgrade_offer_is_answered_in_http_1_1(server):
    # curl --http2 on an http:// URL offers an upgrade to h2c: declined by answering.
    offer = b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
    responses, closed = exchange(server, get("/v2/health/live", offer) + get("/v2/health/ready"), 2)
    assert [r.status for r in responses] == [200, 200] and not closed


def test_max_connections_refuses_the_excess_with_503(server):
    sockets = [connect(server) for _ in range(40)]
    try:
        served = refused = 0
        for s in sockets:
            try:
                s.sendall(get("/v2/health/live"))
                response = Reader(s).next()
            except ConnectionError:
                response = None  # refused before our request arrived: the reset may come first
            if response is not None and response.status == 200:
                served += 1
            else:
                assert response is None or (response.status == 503 and response.headers["retry-after"] == "1"
                                            and response.json()["error"] == "too many connections"), response
                refused += 1
    finally:
        for s in sockets:
            s.close()
    assert 0 < served <= 32 and refused >= 8
    # Once they are gone, new connections are served again.
    wait_for(lambda: _live(server), what="a connection slot")


def _live(server) -> bool:
    try:
        responses, _ = exchange(server, get("/v2/health/live"), 1)
        return responses[0] is not None and responses[0].status == 200
    except OSError:
        return False


def test_native_frontend_with_tls_is_refused(mlp_package, tmp_path):
    # TLS stays with the Python front end or a terminating proxy (README); bearer auth is native.
    result = subprocess.run(
        [sys.executable, "-m", "vivace.cli", "serve", str(mlp_package), "--port", "1", "--http-frontend", "native",
         "--tls-cert", str(tmp_path / "c.pem"), "--tls-key", str(tmp_path / "k.pem")],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "native HTTP front end" in lines[0] and "proxy" in lines[0], result.stderr


# -- metrics -------------------------------------------------------------------------------

def test_native_refusals_are_counted(server):
    before = {code: metric(server, "vivace_http_errors_total", f'code="{code}"') for code in (400, 413, 431)}
    exchange(server, chunked("/v2/models/mlp/infer", b"0\r\n\r\n", b"Content-Length: 5\r\n"), 1)
    exchange(server, b"BREW /pot HTCPCP/1.0\r\n\r\n", 1)
    exchange(server, b"POST /v2/models/mlp/infer HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (BODY_LIMIT + 1), 1)
    exchange(server, b"GET /v2 HTTP/1.1\r\n" + b"X-Flood: v\r\n" * 200 + b"\r\n", 1)
    after = {code: metric(server, "vivace_http_errors_total", f'code="{code}"') for code in (400, 413, 431)}
    assert {code: after[code] - before[code] for code in after} == {400: 2, 413: 1, 431: 1}


def test_native_queue_timeouts_and_cancellations(mlp_package, slow_models):
    srv = ServerProcess(slow_models, "--http-frontend", "native")
    try:
        # slowt times requests out after 50 ms in its queue; batches take 0.3 s, one row each.
        responses, _ = exchange(srv, post("/v2/models/slowt/infer", infer_body()) * 3, 3)
        assert responses[0].status == 200
        for response in responses[1:]:
            assert response.status == 503 and response.headers["retry-after"] == "1", response
            assert response.json() == {"error": "request for model 'slowt' timed out in the queue"}
        assert metric(srv, "vivace_request_failure_total", 'model="slowt",reason="timeout",version="1"') == 2
        # A client that resets its connection: its queued requests are dropped before they run.
        s = connect(srv)
        s.sendall(post("/v2/models/slow/infer", infer_body()) * 6)
        time.sleep(0.05)  # the requests are read and queued (the first one runs for 0.3 s)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
        wait_for(lambda: metric(srv, "vivace_queue_depth", 'model="slow",version="1"') == 0, what="queue drained")
        responses, _ = exchange(srv, post("/v2/models/slow/infer", infer_body()), 1)
        assert responses[0].status == 200
        assert metric(srv, "vivace_inference_count_total", 'model="slow",version="1"') < 6
        # A client that closes normally with requests queued: the server stays healthy.
        with connect(srv) as s:
            s.sendall(post("/v2/models/slow/infer", infer_body()) * 4)
        wait_for(lambda: metric(srv, "vivace_queue_depth", 'model="slow",version="1"') == 0, what="queue drained")
    finally:
        assert srv.stop() == 0


# -- lifecycle -----------------------------------------------------------------------------

def test_sigterm_drains_native_requests_in_flight(slow_models):
    srv = ServerProcess(slow_models, "--http-frontend", "native")
    idle = connect(srv)
    idle.sendall(get("/v2/health/live"))
    idle_reader = Reader(idle)
    assert idle_reader.next().status == 200
    busy = []
    for i in range(3):
        s = connect(srv, timeout=30)
        s.sendall(post("/v2/models/slow/infer", infer_body(id=f"c{i}-0"))
                  + post("/v2/models/slow/infer", infer_body(id=f"c{i}-1")))
        busy.append(s)
    time.sleep(0.3)  # read and queued: six batches of 0.3 s are ahead
    srv.proc.send_signal(signal.SIGTERM)
    try:
        for i, s in enumerate(busy):
            reader = Reader(s)
            for j in range(2):
                response = reader.next()
                assert response is not None and response.status == 200, response
                assert response.json()["id"] == f"c{i}-{j}"
            assert reader.at_eof()  # closed once its accepted requests are answered
        assert idle_reader.at_eof()  # an idle keep-alive connection is closed at once
        assert srv.proc.wait(30) == 0
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", srv.port), timeout=2).close()
    finally:
        for s in (idle, *busy):
            s.close()
        srv.stop()


def test_sigterm_sends_answers_still_buffered_for_a_slow_reader(slow_models):
    # A client that has not read its answers yet when SIGTERM lands: its connection has
    # nothing in flight, but what was answered must still reach it before the close.
    # Executor threads: the loop stays free, so the drain begins while `busy` is served.
    srv = ServerProcess(slow_models, "--http-frontend", "native", "--execution", "threads")
    slow_reader = socket.socket()
    slow_reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow_reader.settimeout(30)
    busy = connect(srv, timeout=30)
    try:
        slow_reader.connect(("127.0.0.1", srv.port))
        count = 150  # 5 MB of answers: more than the socket buffers hold, less than the 4 MB backlog past them
        slow_reader.sendall(get("/v2/openapi.json") * count)
        time.sleep(1.0)  # answered (forwarded to Python), most of it waiting in the server
        busy.sendall(post("/v2/models/slow/infer", infer_body()) * 3)  # keeps the drain going ~0.9 s
        time.sleep(0.1)
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)  # the drain has begun before the slow reader reads
        reader = Reader(slow_reader)
        answers = 0
        while (response := reader.next()) is not None:
            assert response.status == 200
            answers += 1
        assert answers == count
        busy_reader = Reader(busy)
        assert [busy_reader.next().status for _ in range(3)] == [200, 200, 200]
        assert srv.proc.wait(30) == 0
    finally:
        slow_reader.close()
        busy.close()
        srv.stop()


def test_sigterm_answers_every_request_sent_before_it(mlp_package):
    # Keep-alive clients sending 128-row requests back to back; SIGTERM lands while some
    # requests are in the kernel's buffers, not yet read. Every request fully sent before
    # the signal is answered 200; requests sent after it may be refused or reset. It is a
    # race: several drains.
    payload = post("/v2/models/mlp/infer", infer_body(rows=128))
    for attempt in range(3):
        # Shedding off: a refusal for overload on this busy machine is not what is tested.
        srv = ServerProcess([mlp_package], "--http-frontend", "native", "--drain-timeout", "20",
                            "--shed-queue-wait-ms", "0")
        signalled = threading.Event()
        lost: list = []
        served = [0]

        def client(srv=srv, signalled=signalled, served=served, lost=lost):
            try:
                s = connect(srv, timeout=30)
            except OSError:
                return
            reader = Reader(s)
            with s:
                while True:
                    try:
                        s.sendall(payload)
                    except OSError:
                        return
                    sent_before_signal = not signalled.is_set()
                    try:
                        response = reader.next()
                    except (OSError, AssertionError) as exc:
                        response = exc
                    if isinstance(response, Response) and response.status == 200:
                        served[0] += 1
                        continue
                    if sent_before_signal:
                        lost.append(response)
                    return

        threads = [threading.Thread(target=client) for _ in range(24)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        signalled.set()
        srv.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        assert srv.proc.wait(30) == 0
        assert served[0] > 0 and not lost, (attempt, served[0], lost[:5])


def test_queue_full_is_refused_without_waiting_for_python(mlp_package, tmp_path):
    # An inline model: its ~3 s batch runs on the Python loop. A refusal that went through
    # Python would wait for that batch; the front end answers it at once, with the words
    # and the count the Python path uses.
    from vivace.registry.package import load_package, write_package

    manifest = load_package(mlp_package).manifest()
    manifest.pop("files", None)
    manifest.update(name="slowq", max_batch_size=1, parameters={"torch_num_threads": 1})
    manifest["dynamic_batching"]["default_queue_policy"]["max_queue_size"] = 1
    write_package(tmp_path / "slowq", manifest, {"model.pt": slow_model_bytes(1000)})
    srv = ServerProcess([tmp_path / "slowq"], "--http-frontend", "native")
    try:
        running, queued, refused = (connect(srv, timeout=60) for _ in range(3))
        running.sendall(post("/v2/models/slowq/infer", infer_body(id="running")))
        time.sleep(0.3)  # its batch has begun (or it waits in the queue: then both others are refused)
        queued.sendall(post("/v2/models/slowq/infer", infer_body(id="queued")))
        time.sleep(0.05)
        refused.sendall(post("/v2/models/slowq/infer", infer_body(id="refused")))
        response = Reader(refused).next()
        assert response.status == 503 and response.headers["retry-after"] == "1", response
        assert response.json() == {"error": "queue of model 'slowq' is full"}
        running.setblocking(False)
        with pytest.raises(BlockingIOError):  # the batch is still running
            running.recv(1)
        running.setblocking(True)
        assert Reader(running).next().status == 200
        assert metric(srv, "vivace_request_failure_total", 'model="slowq",reason="rejected",version="1"') >= 1
        for s in (running, queued, refused):
            s.close()
    finally:
        assert srv.stop() == 0
