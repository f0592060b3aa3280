"""OpenTelemetry tracing: W3C trace context, head sampling, and spans sent over OTLP/HTTP.

Off unless an endpoint is configured (`vivace serve --trace-endpoint URL`, or
VIVACE_TRACE_ENDPOINT for `vivace pipeline run`); then the `otel` extra
(opentelemetry-sdk, opentelemetry-exporter-otlp-proto-http) must be installed.

Sampling is decided once, at the head, and follows the caller: a request whose
`traceparent` has the sampled flag is traced, one whose flag is clear is not, and one
without a (valid) `traceparent` is traced with probability `ratio`. The native front end
makes the same decision in C++ (csrc/frontend/http_parse.cpp ParseTraceparent) and times
only the requests it traces; the spans are built here, in bulk, from those timings, with
explicit start and end times: by `SpanExport` (OTLP protobuf built directly, what the
server uses) or `Tracing` (the SDK: the pipeline runner, and the same span layout).

Shared by the server (engine/) and the pipeline runner (registry/): nothing here imports
either. The SDK is imported only when tracing is turned on.
"""
from __future__ import annotations

import functools
import os
import random
import re
import struct
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
    if 0 <= value < 0x80:
        return _SMALL_VARINTS[value]
    out = bytearray()
    value &= (1 << 64) - 1  # int64 two's complement, as protobuf encodes negative ints
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_SMALL_VARINTS = [bytes((i,)) for i in range(0x80)]


def _field(tag: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (tag: the field number shifted, wire type 2)."""
    size = len(payload)
    if size < 0x80:
        return bytes((tag, size)) + payload
    return bytes((tag,)) + _varint(size) + payload


def _any_value(value: Any) -> bytes:
    """opentelemetry.proto.common.v1.AnyValue."""
    if isinstance(value, bool):
        return b"\x10" + (b"\x01" if value else b"\x00")
    if isinstance(value, int):
        return b"\x18" + _varint(value)
    if isinstance(value, float):
        return b"\x21" + struct.pack("<d", value)
    return _field(0x0A, str(value).encode())


def _key_value(key: str, value: Any) -> bytes:
    """opentelemetry.proto.common.v1.KeyValue."""
    if isinstance(value, str):  # names of models, paths, methods: the same few again and again
        return _string_key_value(key, value)
    return _field(0x0A, key.encode()) + _field(0x12, _any_value(value))


@functools.lru_cache(maxsize=4096)
def _string_key_value(key: str, value: str) -> bytes:
    return _field(0x0A, key.encode()) + _field(0x12, _field(0x0A, value.encode()))


class SpanExport:
    """The server's request spans, encoded as OTLP protobuf by hand (the Span, KeyValue and
    AnyValue fields of opentelemetry-proto's trace/v1 and common/v1) and POSTed in bulk
    (ExportTraceServiceRequest, application/x-protobuf) from a background thread.

    The SDK's span objects cost about ten times as much per span (start, end, processor,
    then encoding), and protobuf message objects several times the bytes written here: a
    traced request is a few microseconds of Python. Tests decode what this writes with
    opentelemetry-proto.
    `sink`: a callable taking the encoded request (tests)."""

    def __init__(self, endpoint: str | None, service_name: str = DEFAULT_SERVICE, interval_s: float = 1.0,
                 max_spans: int = 200_000, sink: Any = None):
        import threading

        # ResourceSpans.resource (field 1) and the start of ScopeSpans (scope, field 1)
        self._resource = _field(0x0A, _field(0x0A, _key_value("service.name", service_name)))
        self._scope = _field(0x0A, _field(0x0A, b"vivace"))
        self.url = traces_url(endpoint) if endpoint else None
        self._sink = sink
        self.interval_s = interval_s
        self.max_spans = max_spans
        self.dropped = 0
        self.exported = 0
        self._spans: list[bytes] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="vivace-otlp", daemon=True)
        self._thread.start()

    @staticmethod
    def new_id(size: int) -> bytes:
        return (random.getrandbits(size * 8) or 1).to_bytes(size, "big")

    @staticmethod
    def span(trace_id: bytes, span_id: bytes, parent_id: bytes, name: str, kind: int, start: int, end: int,
             attributes: Mapping[str, Any] | None = None, trace_state: str = "", error: bool = False) -> bytes:
        """One encoded opentelemetry.proto.trace.v1.Span (times in epoch ns)."""
        parts = [b"\x0a\x10", trace_id, b"\x12\x08", span_id]
        if trace_state:
            parts.append(_field(0x1A, trace_state.encode()))
        if parent_id:
            parts += (b"\x22\x08", parent_id)
        parts += (_field(0x2A, name.encode()), b"\x30", _varint(kind),
                  struct.pack("<BQBQ", 0x39, start, 0x41, max(start, end)))
        if attributes:
            parts += [_field(0x4A, _key_value(k, v)) for k, v in attributes.items()]
        if error:
            parts.append(b"\x7a\x02\x18\x02")  # status { code: STATUS_CODE_ERROR }
        return b"".join(parts)

    def request_spans(self, trace_id: bytes | None, parent_id: bytes | None, trace_state: str, method: str,
                      target: str, model: str, version: str, status: int | None, rows: int, batch_rows: int,
                      received: int, parsed: int, enqueued: int, batch_start: int, features: int, batch_end: int,
                      answered: int, frontend: str) -> None:
        """One infer request's spans from its timings (epoch ns; 0: did not happen): the
        server span, and under it receive/parse, queue wait, batch execution (with the
        batch size; feature lookup under it when the model looks features up) and the
        response write. No parent: a new trace, the server span its root."""
        internal, server = 1, 2  # SPAN_KIND_INTERNAL, SPAN_KIND_SERVER
        trace_id = trace_id or self.new_id(16)
        root_id = self.new_id(8)
        attributes: dict[str, Any] = {"http.request.method": method, "url.path": target.split("?", 1)[0],
                                      "vivace.model": model, "vivace.model_version": version,
                                      "vivace.frontend": frontend}
        if status is not None:
            attributes["http.response.status_code"] = status
        if rows:
            attributes["vivace.rows"] = rows
        span = self.span
        out = [span(trace_id, root_id, parent_id or b"", f"{method} /v2/models/{model}/infer", server, received,
                    max(answered, batch_end, parsed, received), attributes, trace_state,
                    status is not None and status >= 500)]
        if received and parsed:
            out.append(span(trace_id, self.new_id(8), root_id, "http.receive", internal, received, parsed))
        if enqueued and batch_start:
            out.append(span(trace_id, self.new_id(8), root_id, "batcher.queue", internal, enqueued, batch_start))
        if batch_start and batch_end:
            batch_id = self.new_id(8)
            out.append(span(trace_id, batch_id, root_id, "batch.execute", internal, batch_start, batch_end,
                            {"vivace.batch_size": batch_rows}))
            if features:
                out.append(span(trace_id, self.new_id(8), batch_id, "features.lookup", internal, batch_start,
                                features))
        if answered:
            out.append(span(trace_id, self.new_id(8), root_id, "http.response", internal, batch_end or parsed,
                            answered))
        self.add(out)

    def server_span(self, trace_id: bytes | None, parent_id: bytes | None, trace_state: str, name: str, start: int,
                    end: int, attributes: Mapping[str, Any]) -> None:
        """A request that was not an infer call: its server span alone."""
        self.add([self.span(trace_id or self.new_id(16), self.new_id(8), parent_id or b"", name, 2, start, end,
                            attributes, trace_state)])

    def add(self, spans: list[bytes]) -> None:
        with self._lock:
            if len(self._spans) + len(spans) > self.max_spans:
                self.dropped += len(spans)
                return
            self._spans.extend(spans)

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self.interval_s)
            self._wake.clear()
            self.flush()

    def flush(self) -> None:
        with self._lock:
            spans, self._spans = self._spans, []
        if not spans:
            return
        scope_spans = _field(0x12, self._scope + b"".join(_field(0x12, span) for span in spans))
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
            self.exported += len(spans)
        except Exception as exc:  # noqa: BLE001 - an unreachable collector must not stop serving
            self.dropped += len(spans)
            import logging

            logging.getLogger("vivace.monitor.tracing").warning("OTLP export to %s failed (%d spans dropped): %s",
                                                                self.url, len(spans), exc)

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
