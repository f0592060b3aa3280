"""OpenTelemetry tracing: W3C trace context, head sampling, and spans sent over OTLP/HTTP.

Off unless an endpoint is configured (`vivace serve --trace-endpoint URL`, or
VIVACE_TRACE_ENDPOINT for `vivace pipeline run`); then the `otel` extra
(opentelemetry-sdk, opentelemetry-exporter-otlp-proto-http) must be installed.

Sampling is decided once, at the head, and follows the caller: a request whose
`traceparent` has the sampled flag is traced, one whose flag is clear is not, and one
without a (valid) `traceparent` is traced with probability `ratio`. The native front end
makes the same decision in C++ (csrc/frontend/http_parse.cpp ParseTraceparent) and times
only the requests it traces. The server's spans are encoded by the core
(csrc/frontend/otlp.cpp) and exported by `SpanExport`; the pipeline runner's steps are
spans of the SDK (`Tracing`).

Shared by the server (engine/) and the pipeline runner (registry/): nothing here imports
either. The SDK is imported only when tracing is turned on.
"""
from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Mapping, MutableMapping
from typing import Any, NamedTuple

# version "-" trace-id "-" parent-id "-" flags, lowercase hex (W3C trace context, level 1)
_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
DEFAULT_RATIO = 0.01
DEFAULT_SERVICE = "vivace"


class TraceParent(NamedTuple):
    trace_id: int
    span_id: int
    flags: int

    @property
    def sampled(self) -> bool:
        return bool(self.flags & 1)


def parse_traceparent(value: bytes | str | None) -> TraceParent | None:
    """The W3C `traceparent` header's fields, or None when it is absent or malformed
    (a malformed one is treated as absent): lowercase hex only, version ff refused,
    all-zero ids refused, version 00 exactly 55 characters, a later version at least 55
    with a '-' after them (the same rules as the native parser)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = value.encode("latin-1", "replace")
    value = value.strip(b" \t")
    m = _TRACEPARENT.match(value)
    if m is None:
        return None
    version = int(m.group(1), 16)
    if version == 0xFF or (version == 0 and len(value) != 55) or (len(value) > 55 and value[55:56] != b"-"):
        return None
    trace_id, span_id = int(m.group(2), 16), int(m.group(3), 16)
    if trace_id == 0 or span_id == 0:
        return None
    return TraceParent(trace_id, span_id, int(m.group(4), 16))


def format_traceparent(trace_id: int, span_id: int, sampled: bool = True) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}"


def should_sample(parent: TraceParent | None, ratio: float, draw: float | None = None) -> bool:
    """Parent-based head sampling: the caller's flag when it sent one, else the ratio."""
    if parent is not None:
        return parent.sampled
    return (random.random() if draw is None else draw) < ratio


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL of a collector: a base URL (http://host:4318) gets the
    signal's path /v1/traces, as OTEL_EXPORTER_OTLP_ENDPOINT does; a URL already ending
    in /v1/traces is kept."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/traces") else endpoint + "/v1/traces"


class Tracing:
    """A tracer provider exporting to one OTLP/HTTP endpoint (the pipeline runner's steps),
    with the ratio for requests that arrive without trace context. The SDK samples
    everything it is given: the head decision is ours (`sample`)."""

    def __init__(self, endpoint: str, ratio: float = DEFAULT_RATIO, service_name: str = DEFAULT_SERVICE):
        try:
            from opentelemetry import trace
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.sdk.trace.sampling import ALWAYS_ON
        except ImportError as exc:
            raise RuntimeError("tracing needs the OpenTelemetry SDK: pip install 'vivace[otel]'") from exc
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"the trace sample ratio must be within [0, 1], got {ratio:g}")
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=traces_url(endpoint), timeout=10)
        self.endpoint = endpoint
        self.ratio = ratio
        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}), sampler=ALWAYS_ON)
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("vivace")
        self._trace = trace

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Tracing | None:
        """Tracing as VIVACE_TRACE_ENDPOINT (and VIVACE_TRACE_SAMPLE_RATIO, default 1,
        VIVACE_TRACE_SERVICE_NAME) ask, or None when no endpoint is set."""
        endpoint = environ.get("VIVACE_TRACE_ENDPOINT")
        if not endpoint:
            return None
        return cls(endpoint, float(environ.get("VIVACE_TRACE_SAMPLE_RATIO", "1")),
                   environ.get("VIVACE_TRACE_SERVICE_NAME", "vivace-pipeline"))

    # -- decisions and contexts ------------------------------------------------------------
    def sample(self, traceparent: bytes | str | None) -> tuple[bool, TraceParent | None]:
        parent = parse_traceparent(traceparent)
        return should_sample(parent, self.ratio), parent

    def context(self, parent: TraceParent | None, tracestate: bytes | str | None = None) -> Any:
        """An OpenTelemetry context whose current span is the remote `parent` (None: none)."""
        if parent is None:
            return None
        from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

        state = None
        if tracestate:
            text = tracestate.decode("latin-1") if isinstance(tracestate, bytes) else tracestate
            state = TraceState.from_header([text])
        span_context = SpanContext(parent.trace_id, parent.span_id, is_remote=True,
                                   trace_flags=TraceFlags(parent.flags & 0xFF), trace_state=state)
        return self._trace.set_span_in_context(NonRecordingSpan(span_context))

    def span(self, name: str, context: Any = None, kind: str = "internal", attributes: Mapping[str, Any] | None = None,
             start_ns: int | None = None) -> Any:
        """A started span (end it with .end(end_time=ns)); `context` its parent's context."""
        span_kind = getattr(self._trace.SpanKind, kind.upper())
        return self.tracer.start_span(name, context=context, kind=span_kind, attributes=dict(attributes or {}),
                                      start_time=start_ns)

    def child_context(self, span: Any) -> Any:
        return self._trace.set_span_in_context(span)

    def shutdown(self) -> None:
        self.provider.shutdown()


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(tag: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (tag: the field number shifted, wire type 2)."""
    return bytes((tag,)) + _varint(len(payload)) + payload


class SpanExport:
    """The server's spans, exported over OTLP/HTTP in bulk (ExportTraceServiceRequest,
    application/x-protobuf) from a background thread.

    The spans arrive encoded, as ScopeSpans.spans fields: the core writes them
    (csrc/frontend/otlp.cpp, the one writer of the span layout; the native front end
    encodes its traced requests there without Python), so a traced request costs no
    span objects. Here they are wrapped in the resource (service.name) and scope
    ("vivace") and POSTed. `sink`: a callable taking the encoded request (tests)."""

    def __init__(self, endpoint: str | None, service_name: str = DEFAULT_SERVICE, interval_s: float = 1.0,
                 max_bytes: int = 64 << 20, sink: Any = None):
        import threading

        # Resource { attributes: [KeyValue { key, value: AnyValue }] }: the service, and the
        # process (each of `vivace serve --workers N` exports its own spans).
        service = _field(0x0A, b"service.name") + _field(0x12, _field(0x0A, service_name.encode()))
        pid = _field(0x0A, b"process.pid") + _field(0x12, b"\x18" + _varint(os.getpid()))  # int_value
        self._resource = _field(0x0A, _field(0x0A, service) + _field(0x0A, pid))  # ResourceSpans.resource
        self._scope = _field(0x0A, _field(0x0A, b"vivace"))  # ScopeSpans.scope { name }
        self.url = traces_url(endpoint) if endpoint else None
        self._sink = sink
        self.interval_s = interval_s
        self.max_bytes = max_bytes
        self.dropped = 0
        self.exported = 0
        self._chunks: list[bytes] = []
        self._count = 0
        self._size = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="vivace-otlp", daemon=True)
        self._thread.start()

    def add(self, spans: bytes, count: int) -> None:
        """Queue `count` encoded spans (ScopeSpans.spans fields, as the core writes them);
        beyond max_bytes waiting they are dropped and counted."""
        if not count:
            return
        with self._lock:
            if self._size + len(spans) > self.max_bytes:
                self.dropped += count
                return
            self._chunks.append(spans)
            self._count += count
            self._size += len(spans)

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self.interval_s)
            self._wake.clear()
            self.flush()

    def flush(self) -> None:
        with self._lock:
            chunks, count = self._chunks, self._count
            self._chunks, self._count, self._size = [], 0, 0
        if not chunks:
            return
        scope_spans = _field(0x12, self._scope + b"".join(chunks))
        body = _field(0x0A, self._resource + scope_spans)  # ExportTraceServiceRequest.resource_spans
        try:
            if self._sink is not None:
                self._sink(body)
            elif self.url is not None:
                import urllib.request

                post = urllib.request.Request(self.url, data=body, method="POST",
                                              headers={"Content-Type": "application/x-protobuf"})
                with urllib.request.urlopen(post, timeout=10) as response:
                    response.read()
            self.exported += count
        except Exception as exc:  # noqa: BLE001 - an unreachable collector must not stop serving
            self.dropped += count
            import logging

            logging.getLogger("vivace.monitor.tracing").warning("OTLP export to %s failed (%d spans dropped): %s",
                                                                self.url, count, exc)

    def close(self) -> None:
        """Export what is queued and stop the thread."""
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=15)
        self.flush()


def monotonic_offset_ns() -> int:
    """Add to a CLOCK_MONOTONIC ns reading (time.monotonic_ns, C++ steady_clock) to get
    Unix-epoch ns, as spans carry."""
    return time.time_ns() - time.monotonic_ns()


def current_traceparent() -> str | None:
    """The traceparent of the current OpenTelemetry span, when the SDK is installed and
    a recording span is current; None otherwise."""
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return None
    return format_traceparent(span_context.trace_id, span_context.span_id, bool(span_context.trace_flags & 1))


def inject(headers: MutableMapping[str, str], traceparent: str | None = None) -> MutableMapping[str, str]:
    """Add `traceparent` (the current span's when not given) to outgoing HTTP headers."""
    value = traceparent or current_traceparent()
    if value:
        headers["traceparent"] = value
    return headers


def inject_env(env: MutableMapping[str, str], traceparent: str | None = None) -> MutableMapping[str, str]:
    """Add TRACEPARENT (the environment-carrier convention of OpenTelemetry) to a child
    process's environment: the current span's, or one given."""
    value = traceparent or current_traceparent()
    if value:
        env["TRACEPARENT"] = value
    return env
