"""The server's side of tracing (`vivace serve --trace-endpoint`): which requests are
traced and the spans they make, on both front ends.

The sampling decisions are monitor/tracing.py's; the span layout is the core's one encoder
(csrc/frontend/otlp.cpp), for both paths. Here:
- `ServerTracing.begin`: a request that reached Python (the uvloop front end, or a request
  the native one forwarded) is sampled from its `traceparent`; a sampled one gets a
  `RequestTrace`, which an infer call carries to its completion (engine/infer.py), where
  the batcher's timings of it (`Batcher.take_traces`) are added;
- `ServerTracing.drain_native`: the native front end times the fast-path requests it
  traces in C++ and encodes their spans there in bulk; here the bytes are taken, on a
  timer, and queued for export: no Python runs per request on the fast path, traced or not.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from vivace import _core
from vivace.monitor.tracing import SpanExport, monotonic_offset_ns, parse_traceparent, should_sample

from .config import ServerConfig

log = logging.getLogger("vivace.engine.tracing")

DRAIN_INTERVAL_S = 0.05  # how often the native front end's timings become spans (short: small bursts, low p99)


class RequestTrace:
    """A sampled request on the Python path: its parent and timings (monotonic ns)."""

    __slots__ = ("owner", "trace_id", "parent_id", "tracestate", "method", "target", "received", "parsed",
                 "frontend", "claimed")

    def __init__(self, owner: ServerTracing, trace_id: bytes | None, parent_id: bytes | None, tracestate: str,
                 method: bytes, target: bytes, received: int, parsed: int, frontend: str):
        self.owner = owner
        self.trace_id = trace_id
        self.parent_id = parent_id
        self.tracestate = tracestate
        self.method = method.decode("latin-1")
        self.target = target.decode("latin-1")
        self.received = received or parsed
        self.parsed = parsed
        self.frontend = frontend
        self.claimed = False  # an infer call finishes it when answered

    def finish_infer(self, runner: Any, status: int | None, rows: int, timings: tuple | None) -> None:
        """An infer call was answered: its spans, with the batcher's timings when it ran."""
        enqueued = batch_start = features = batch_end = batch_rows = 0
        if timings is not None:
            _, enqueued, batch_start, features, batch_end, batch_rows = timings
        self.owner.emit(self.trace_id, self.parent_id, self.tracestate, self.method, self.target, runner.name,
                        runner.version, status, rows, batch_rows, self.received, self.parsed, enqueued, batch_start,
                        features, batch_end, time.monotonic_ns(), self.frontend)

    def finish(self, status: int | None = None) -> None:
        """A request that did not become an infer call (another route, or a refusal): the
        server span alone."""
        self.owner.emit(self.trace_id, self.parent_id, self.tracestate, self.method, self.target, "", "", status, 0,
                        0, self.received, 0, 0, 0, 0, 0, time.monotonic_ns(), self.frontend)


class ServerTracing:
    """Tracing of one server process: sampling decisions of the Python path, and the
    spans of both front ends' traced requests, exported over OTLP/HTTP in bulk."""

    def __init__(self, config: ServerConfig, sink: Any = None):
        self.export = SpanExport(config.trace_endpoint, config.trace_service_name, sink=sink)
        self.ratio = config.trace_sample_ratio
        self.offset = monotonic_offset_ns()  # CLOCK_MONOTONIC ns → Unix ns

    def begin(self, traceparent: bytes | None, tracestate: bytes | None, received: int, method: bytes,
              target: bytes, frontend: str) -> RequestTrace | None:
        """A trace for a request that reached Python, or None when it is not sampled."""
        parent = parse_traceparent(traceparent) if traceparent is not None else None
        if not should_sample(parent, self.ratio):
            return None
        if parent is None:
            return RequestTrace(self, None, None, "", method, target, received, time.monotonic_ns(), frontend)
        return RequestTrace(self, parent.trace_id.to_bytes(16, "big"), parent.span_id.to_bytes(8, "big"),
                            tracestate.decode("latin-1") if tracestate else "", method, target, received,
                            time.monotonic_ns(), frontend)

    def emit(self, trace_id: bytes | None, parent_id: bytes | None, tracestate: str, method: str, target: str,
             model: str, version: str, status: int | None, rows: int, batch_rows: int, received: int, parsed: int,
             enqueued: int, batch_start: int, features: int, batch_end: int, answered: int, frontend: str) -> None:
        offset = self.offset
        try:
            spans, count = _core.encode_request_spans(
                trace_id, parent_id, tracestate, method, target, frontend, model, version, status, rows, batch_rows,
                received and received + offset, parsed and parsed + offset, enqueued and enqueued + offset,
                batch_start and batch_start + offset, features and features + offset,
                batch_end and batch_end + offset, answered and answered + offset)
            self.export.add(spans, count)
        except Exception:  # tracing must never fail the request it describes
            log.exception("cannot record the spans of a request")

    def drain_native(self, core: Any) -> int:
        """Spans for the fast-path requests the native front end traced since the last
        call; returns how many."""
        spans, count, requests, dropped = core.take_trace_spans(self.offset)
        if dropped:
            self.export.dropped += dropped
            log.warning("tracing: the native front end dropped the timings of %d traced requests", dropped)
        self.export.add(spans, count)
        return requests

    def shutdown(self) -> None:
        try:
            self.export.close()  # exports what is still queued
        except Exception:
            log.exception("tracing: cannot flush the last spans")
