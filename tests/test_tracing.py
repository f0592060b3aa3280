"""OpenTelemetry tracing (issue 19 item 1): W3C traceparent parsing (the Python and the
native parser agree), head sampling, and spans of a real `vivace serve` on both front
ends exported over OTLP/HTTP to a receiver started here on 127.0.0.1."""
from __future__ import annotations

import http.client
import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("opentelemetry.sdk.trace")
pytest.importorskip("opentelemetry.exporter.otlp.proto.http.trace_exporter")

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest  # noqa: E402

from vivace import _core  # noqa: E402
from vivace.bench.http import OtlpSink  # noqa: E402
from vivace.monitor import tracing  # noqa: E402

from conftest import ServerProcess, wait_for  # noqa: E402

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
VALID = f"00-{TRACE_ID}-{PARENT_ID}-01"

CASES = [
    (VALID, (int(TRACE_ID, 16), int(PARENT_ID, 16), 1)),
    (f"00-{TRACE_ID}-{PARENT_ID}-00", (int(TRACE_ID, 16), int(PARENT_ID, 16), 0)),
    (f"01-{TRACE_ID}-{PARENT_ID}-01-future-field", (int(TRACE_ID, 16), int(PARENT_ID, 16), 1)),  # later version
    (f"01-{TRACE_ID}-{PARENT_ID}-01", (int(TRACE_ID, 16), int(PARENT_ID, 16), 1)),
    (f"ff-{TRACE_ID}-{PARENT_ID}-01", None),                    # version ff is invalid
    (f"00-{'0' * 32}-{PARENT_ID}-01", None),                    # all-zero trace id
    (f"00-{TRACE_ID}-{'0' * 16}-01", None),                     # all-zero parent id
    (f"00-{TRACE_ID.upper()}-{PARENT_ID}-01", None),            # uppercase hex
    (f"00-{TRACE_ID}-{PARENT_ID}-01-extra", None),              # version 00 has exactly 4 fields
    (f"01-{TRACE_ID}-{PARENT_ID}-01x", None),                   # later version: '-' after the flags
    (f"00-{TRACE_ID[:-1]}-{PARENT_ID}-01", None),               # short trace id
    (f"00_{TRACE_ID}_{PARENT_ID}_01", None),
    ("", None),
    ("garbage", None),
    (f"0g-{TRACE_ID}-{PARENT_ID}-01", None),
]


@pytest.mark.parametrize("value, expected", CASES)
def test_traceparent_parsing_python_and_native_agree(value, expected):
    parsed = tracing.parse_traceparent(value)
    assert (tuple(parsed) if parsed else None) == expected
    native = _core.parse_traceparent(value.encode())
    if expected is None:
        assert native is None
    else:
        assert (int.from_bytes(native[0], "big"), int.from_bytes(native[1], "big"), native[2]) == expected


def test_sampling_is_parent_based_then_ratio():
    sampled = tracing.parse_traceparent(VALID)
    unsampled = tracing.parse_traceparent(f"00-{TRACE_ID}-{PARENT_ID}-00")
    assert tracing.should_sample(sampled, 0.0) and not tracing.should_sample(unsampled, 1.0)
    assert tracing.should_sample(None, 0.5, draw=0.49) and not tracing.should_sample(None, 0.5, draw=0.5)
    assert not tracing.should_sample(None, 0.0, draw=0.0) and tracing.should_sample(None, 1.0, draw=0.999)
    assert tracing.traces_url("http://h:4318") == "http://h:4318/v1/traces"
    assert tracing.traces_url("http://h:4318/v1/traces") == "http://h:4318/v1/traces"
    assert tracing.format_traceparent(int(TRACE_ID, 16), int(PARENT_ID, 16)) == VALID


def export_of(*requests: dict, service: str = "unit") -> tuple[ExportTraceServiceRequest, tracing.SpanExport]:
    """The requests' spans as the core encodes them (`_core.encode_request_spans` keyword
    arguments each), exported once by SpanExport and decoded by opentelemetry-proto."""
    bodies: list[bytes] = []
    export = tracing.SpanExport(None, service, sink=bodies.append)
    for request in requests:
        export.add(*_core.encode_request_spans(**request))
    export.close()
    (body,) = bodies
    decoded = ExportTraceServiceRequest()
    decoded.ParseFromString(body)
    return decoded, export


INFER = dict(trace_id=bytes.fromhex(TRACE_ID), parent_id=bytes.fromhex(PARENT_ID), trace_state="vendor=x",
             method="POST", target="/v2/models/m/infer?x=1", frontend="native", model="m", version="1", status=200,
             rows=2, batch_rows=8, received=1000, parsed=2000, enqueued=2100, batch_start=3000, features=3500,
             batch_end=5000, answered=6000)


def test_request_spans_layout():
    """The spans of one traced request: the server span continuing the client's trace, its
    children in time, the batch size, and the feature lookup under the batch."""
    request, export = export_of(INFER)
    (resource_spans,) = request.resource_spans
    resource = {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in resource_spans.resource.attributes}
    assert resource == {"service.name": "unit", "process.pid": os.getpid()}
    assert resource_spans.scope_spans[0].scope.name == "vivace"
    spans = {s.name: s for s in resource_spans.scope_spans[0].spans}
    assert set(spans) == {"POST /v2/models/m/infer", "http.receive", "batcher.queue", "batch.execute",
                          "features.lookup", "http.response"}
    root = spans["POST /v2/models/m/infer"]
    assert root.trace_id == bytes.fromhex(TRACE_ID) and root.parent_span_id == bytes.fromhex(PARENT_ID)
    assert root.trace_state == "vendor=x" and root.kind == 2 and root.status.code == 0
    assert (root.start_time_unix_nano, root.end_time_unix_nano) == (1000, 6000)
    assert {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in root.attributes} == {
        "http.request.method": "POST", "url.path": "/v2/models/m/infer", "vivace.model": "m",
        "vivace.model_version": "1", "vivace.frontend": "native", "http.response.status_code": 200, "vivace.rows": 2}
    assert {a.key: a.value.int_value for a in spans["batch.execute"].attributes} == {"vivace.batch_size": 8}
    assert spans["features.lookup"].parent_span_id == spans["batch.execute"].span_id
    for name in ("http.receive", "batcher.queue", "batch.execute", "http.response"):
        assert spans[name].parent_span_id == root.span_id and spans[name].kind == 1
        assert spans[name].trace_id == root.trace_id and spans[name].trace_state == ""
    times = {name: (s.start_time_unix_nano, s.end_time_unix_nano) for name, s in spans.items()}
    assert times["http.receive"] == (1000, 2000) and times["batcher.queue"] == (2100, 3000)
    assert times["batch.execute"] == (3000, 5000) and times["features.lookup"] == (3000, 3500)
    assert times["http.response"] == (5000, 6000)
    assert len({s.span_id for s in spans.values()}) == 6 and export.exported == 6 and export.dropped == 0


def test_spans_of_new_traces_errors_and_other_routes():
    """No parent: a new trace with the server span as its root; a 5xx marks the server span
    an error; a request that never ran has no batch spans; another route gets the server
    span alone, named after its path."""
    unparented = dict(INFER, trace_id=None, parent_id=None, trace_state="", status=503, features=0)
    never_ran = dict(INFER, status=503, enqueued=0, batch_start=0, features=0, batch_end=0)
    other = dict(trace_id=None, parent_id=None, trace_state="", method="GET", target="/v2/health/ready?verbose",
                 frontend="python", status=200, received=10, answered=20)
    request, export = export_of(unparented, unparented, never_ran, other)
    spans = list(request.resource_spans[0].scope_spans[0].spans)
    assert export.exported == len(spans) == 5 + 5 + 3 + 1
    by_trace: dict[bytes, list] = {}
    for span in spans:
        by_trace.setdefault(span.trace_id, []).append(span)
    assert len(by_trace) == 4 and all(len(t) == 16 and t != bytes(16) for t in by_trace)  # fresh random ids
    first = by_trace[spans[0].trace_id]
    root = first[0]
    assert root.parent_span_id == b"" and root.status.code == 2
    assert {s.name for s in first} == {"POST /v2/models/m/infer", "http.receive", "batcher.queue", "batch.execute",
                                       "http.response"}
    assert [s.name for s in by_trace[bytes.fromhex(TRACE_ID)]] == ["POST /v2/models/m/infer", "http.receive",
                                                                   "http.response"]
    (health,) = by_trace[spans[-1].trace_id]
    assert health.name == "GET /v2/health/ready" and health.kind == 2
    assert (health.start_time_unix_nano, health.end_time_unix_nano) == (10, 20)
    assert {a.key for a in health.attributes} == {"http.request.method", "url.path", "vivace.frontend",
                                                  "http.response.status_code"}


def test_encoded_spans_decode_with_opentelemetry_proto():
    """Long (multi-byte length) and non-ASCII strings, 64-bit times and large counts,
    decoded by the reference protobuf classes; ids of the wrong size are refused."""
    long_state = ",".join(f"vendor{i}=value{i}" for i in range(40))
    request, _ = export_of(dict(INFER, trace_state=long_state, model="mödel-" + "é" * 100, version="v" * 300,
                                rows=2**40, batch_rows=2**62, received=10**18, parsed=10**18 + 1, enqueued=0,
                                batch_start=0, features=0, batch_end=0, answered=2**63 - 1),
                           service="svc-é")
    assert request.resource_spans[0].resource.attributes[0].value.string_value == "svc-é"
    root, receive, response = request.resource_spans[0].scope_spans[0].spans
    attributes = {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in root.attributes}
    assert root.name == "POST /v2/models/mödel-" + "é" * 100 + "/infer" and root.trace_state == long_state
    assert attributes["vivace.model"] == "mödel-" + "é" * 100 and attributes["vivace.model_version"] == "v" * 300
    assert attributes["vivace.rows"] == 2**40
    assert (root.start_time_unix_nano, root.end_time_unix_nano) == (10**18, 2**63 - 1)
    assert (receive.start_time_unix_nano, receive.end_time_unix_nano) == (10**18, 10**18 + 1)
    assert response.start_time_unix_nano == 10**18 + 1  # from the parse, when no batch ran
    for bad in (dict(INFER, trace_id=b"short"), dict(INFER, parent_id=None), dict(INFER, parent_id=b"x" * 9)):
        with pytest.raises(ValueError, match="trace_id"):
            _core.encode_request_spans(**bad)


def test_propagation_helpers():
    from opentelemetry import trace as otel_trace
    from opentelemetry.sdk.trace import TracerProvider

    headers = tracing.inject({}, VALID)
    assert headers == {"traceparent": VALID}
    assert tracing.inject({}) == {}  # no current span: nothing added
    tracer = TracerProvider().get_tracer("t")
    with tracer.start_as_current_span("x") as span:
        env = tracing.inject_env({})
        assert env["TRACEPARENT"] == tracing.format_traceparent(span.get_span_context().trace_id,
                                                                 span.get_span_context().span_id)
    assert otel_trace.get_current_span().get_span_context().is_valid is False


# -- an OTLP/HTTP receiver ------------------------------------------------------------------
class Receiver(OtlpSink):
    """The bench's OTLP/HTTP sink on 127.0.0.1, decoding each ExportTraceServiceRequest into spans."""

    def __init__(self):
        self.spans: list[dict] = []
        super().__init__(on_export=self.record)

    def record(self, body: bytes) -> None:
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        for resource_spans in request.resource_spans:
            resource = {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in resource_spans.resource.attributes}
            service, pid = resource.get("service.name"), resource.get("process.pid")
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    attributes = {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in span.attributes}
                    self.spans.append({
                        "name": span.name, "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
                        "parent": span.parent_span_id.hex(), "start": span.start_time_unix_nano,
                        "end": span.end_time_unix_nano, "attributes": attributes, "service": service,
                        "pid": pid, "trace_state": span.trace_state})

    def traces(self) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        for span in list(self.spans):
            out.setdefault(span["trace_id"], []).append(span)
        return out



@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


ROW = [0.1] * 32


def infer(port: int, headers: dict | None = None, rows: int = 1, path: str = "/v2/models/mlp/infer") -> int:
    body = json.dumps({"inputs": [{"name": "input__0", "shape": [rows, 32], "datatype": "FP32", "data": ROW * rows}]})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", path, body, {"content-type": "application/json", **(headers or {})})
    response = conn.getresponse()
    response.read()
    conn.close()
    return response.status


def tree(spans: list[dict]) -> tuple[dict, dict[str, dict]]:
    """The server span of one trace and its children by name."""
    (root,) = [s for s in spans if s["name"].endswith("/infer")]
    children = {s["name"]: s for s in spans if s["parent"] == root["span_id"]}
    return root, children


@pytest.mark.parametrize("frontend", ["native", "python"])
def test_spans_end_to_end(mlp_package, receiver, frontend):
    srv = ServerProcess([mlp_package], "--http-frontend", frontend, "--trace-endpoint", receiver.url,
                        "--trace-sample-ratio", "0", "--trace-service-name", "vivace-test")
    try:
        # A sampled parent: traced, continuing the client's trace.
        assert infer(srv.port, {"traceparent": VALID, "tracestate": "vendor=abc"}, rows=3) == 200
        # An unsampled parent: nothing, whatever the ratio.
        other = "5bf92f3577b34da6a3ce929d0e0e4737"
        assert infer(srv.port, {"traceparent": f"00-{other}-{PARENT_ID}-00"}) == 200
        # No traceparent at ratio 0: nothing.
        for _ in range(5):
            assert infer(srv.port) == 200
        # A malformed traceparent is absent: ratio 0, nothing.
        assert infer(srv.port, {"traceparent": f"ff-{other}-{PARENT_ID}-01"}) == 200
        # A parsed, versioned route of another request kind (metadata) through Python.
        third = "6bf92f3577b34da6a3ce929d0e0e4738"
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
        conn.request("GET", "/v2/models/mlp", headers={"traceparent": f"00-{third}-{PARENT_ID}-01"})
        assert conn.getresponse().status == 200
        conn.close()
        wait_for(lambda: TRACE_ID in receiver.traces() and third in receiver.traces()
                 and len(tree(receiver.traces()[TRACE_ID])[1]) >= 4, timeout=30, what="the spans")
    finally:
        assert srv.stop() == 0
    traces = receiver.traces()
    assert set(traces) == {TRACE_ID, third}, "only the sampled requests are traced"
    root, children = tree(traces[TRACE_ID])
    assert root["parent"] == PARENT_ID and root["service"] == "vivace-test"
    assert root["trace_state"] == "vendor=abc"
    assert root["attributes"]["vivace.model"] == "mlp"
    assert root["attributes"]["http.response.status_code"] == 200
    assert root["attributes"]["vivace.frontend"] == frontend
    assert set(children) >= {"http.receive", "batcher.queue", "batch.execute", "http.response"}
    assert children["batch.execute"]["attributes"]["vivace.batch_size"] >= 3
    for child in children.values():
        assert root["start"] <= child["start"] <= child["end"] <= root["end"]
    assert children["batcher.queue"]["end"] <= children["batch.execute"]["start"] + 1000
    (meta,) = traces[third]
    assert meta["name"] == "GET /v2/models/mlp" and meta["parent"] == PARENT_ID


def test_ratio_one_traces_requests_without_parent(mlp_package, receiver):
    srv = ServerProcess([mlp_package], "--trace-endpoint", receiver.url, "--trace-sample-ratio", "1")
    try:
        for _ in range(4):
            assert infer(srv.port) == 200
        wait_for(lambda: sum(1 for spans in receiver.traces().values()
                             if any(s["name"] == "batch.execute" for s in spans)) >= 4, what="4 traces")
    finally:
        assert srv.stop() == 0
    infer_traces = [spans for spans in receiver.traces().values() if any(s["name"].endswith("/infer") for s in spans)]
    assert len(infer_traces) == 4  # (the readiness probes of ServerProcess are traced too)
    for spans in infer_traces:
        root, children = tree(spans)
        assert root["parent"] == ""  # a root: no caller's trace to continue
        assert children["batch.execute"]["attributes"]["vivace.batch_size"] == 1


@pytest.mark.parametrize("frontend", ["native", "python"])
def test_entity_lookup_is_a_span_under_the_batch(entity_home, receiver, frontend):
    """A model served by entity id: the batch's feature lookup in the LMDB online store is
    its own span, under batch.execute."""
    home, packages = entity_home
    srv = ServerProcess([packages["error"]], "--http-frontend", frontend, "--trace-endpoint", receiver.url,
                        "--trace-sample-ratio", "0", env={"VIVACE_HOME": str(home)})
    try:
        body = json.dumps({"inputs": [{"name": "customer_id", "shape": [3, 1], "datatype": "INT64",
                                       "data": [3, 17, 100]}]})
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
        conn.request("POST", "/v2/models/scorer_error/infer", body, {"traceparent": VALID})
        assert conn.getresponse().status == 200
        conn.close()
        wait_for(lambda: any(s["name"] == "features.lookup" for s in receiver.traces().get(TRACE_ID, [])),
                 timeout=30, what="the lookup span")
    finally:
        assert srv.stop() == 0
    spans = receiver.traces()[TRACE_ID]
    root, children = tree(spans)
    batch = children["batch.execute"]
    (lookup,) = [s for s in spans if s["name"] == "features.lookup"]
    assert lookup["parent"] == batch["span_id"] and lookup["trace_id"] == root["trace_id"]
    assert batch["start"] <= lookup["start"] <= lookup["end"] <= batch["end"]
    assert root["attributes"]["vivace.model"] == "scorer_error" and root["attributes"]["vivace.rows"] == 3


def test_every_worker_exports_its_spans(mlp_package, receiver):
    """`--workers 2`: each worker process traces the requests it serves and exports them
    under its own process.pid; every sampled request's trace arrives whole."""
    srv = ServerProcess([mlp_package], "--workers", "2", "--trace-endpoint", receiver.url,
                        "--trace-sample-ratio", "0")
    sent: list[str] = []

    def both_workers_exported() -> bool:  # the second worker may still be starting at first
        for _ in range(8):  # a connection each: the kernel spreads them over the workers
            trace_id = f"{len(sent) + 1:032x}"
            assert infer(srv.port, {"traceparent": f"00-{trace_id}-{PARENT_ID}-01"}) == 200
            sent.append(trace_id)
        return len({s["pid"] for s in receiver.spans}) == 2

    try:
        wait_for(both_workers_exported, timeout=60, what="spans from both workers")
        wait_for(lambda: all(len(tree(receiver.traces().get(t, []))[1]) >= 4 if t in receiver.traces() else False
                             for t in sent), timeout=30, what="every trace")
    finally:
        assert srv.stop() == 0
    traces = receiver.traces()
    for trace_id in sent:
        root, _ = tree(traces[trace_id])
        assert root["parent"] == PARENT_ID and {s["pid"] for s in traces[trace_id]} == {root["pid"]}
    assert len({tree(traces[t])[0]["pid"] for t in sent}) == 2


def test_tracing_off_exports_nothing(mlp_package, receiver):
    srv = ServerProcess([mlp_package], env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url})
    try:
        for _ in range(3):
            assert infer(srv.port, {"traceparent": VALID}) == 200
    finally:
        assert srv.stop() == 0
    assert receiver.posts == 0 and receiver.spans == []


def test_serve_help_lists_the_flags():
    import subprocess

    out = subprocess.run([sys.executable, "-m", "vivace.cli", "serve", "--help"], capture_output=True, text=True,
                         env=dict(os.environ, COLUMNS="200"), check=True).stdout
    for flag in ("--trace-endpoint", "--trace-sample-ratio", "--trace-service-name"):
        assert flag in out


PIPELINE = """
name: traced
steps:
  - {name: first, type: shell, run: 'printf %s "$TRACEPARENT" > first.txt', outputs: {t: first.txt}}
  - {name: second, type: shell, run: 'printf %s "$TRACEPARENT" > second.txt', outputs: {t: second.txt}, needs: [first]}
"""


def test_pipeline_steps_are_spans_and_get_traceparent(tmp_path, receiver):
    import subprocess

    (tmp_path / "p.yaml").write_text(PIPELINE)
    env = dict(os.environ, VIVACE_TRACE_ENDPOINT=receiver.url, TRACEPARENT=VALID)
    proc = subprocess.run([sys.executable, "-m", "vivace.cli", "--home", str(tmp_path / "home"), "pipeline", "run",
                           str(tmp_path / "p.yaml")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    spans = {s["name"]: s for s in receiver.traces()[TRACE_ID]}  # the runner's shutdown flushed them
    run = spans["pipeline traced"]
    assert run["parent"] == PARENT_ID
    for name in ("first", "second"):
        step = spans[f"pipeline.step {name}"]
        assert step["parent"] == run["span_id"] and step["attributes"]["vivace.step.type"] == "shell"
        workdir_file = next(tmp_path.rglob(f"{name}.txt"))
        assert workdir_file.read_text() == f"00-{TRACE_ID}-{step['span_id']}-01"


def test_webhook_carries_the_current_traceparent(receiver):
    from opentelemetry.sdk.trace import TracerProvider

    from vivace.monitor.alerts import AlertConfig, fire_alert

    seen: list[str | None] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):
            seen.append(self.headers.get("traceparent"))
            self.rfile.read(int(self.headers["content-length"]))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        config = AlertConfig(webhook_url=f"http://127.0.0.1:{server.server_address[1]}/hook")
        payload = {"model": "m", "version": "1", "kind": "drift"}
        fire_alert(config, payload, "test", {}, [])
        with TracerProvider().get_tracer("t").start_as_current_span("alert") as span:
            fire_alert(config, payload, "test", {}, [])
            context = span.get_span_context()
    finally:
        server.shutdown()
        server.server_close()
    assert seen == [None, tracing.format_traceparent(context.trace_id, context.span_id)]
