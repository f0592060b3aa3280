"""One infer call, independent of the transport that carried it.

`Inference.submit` takes an infer body for a model runner and a `Sink` — where the answer
goes — and queues the request in the model's batcher (or refuses it); `InferCall.done`
turns the batch's result into an `Outcome`: the status, the body and the JSON length of a
binary-extension body. Both HTTP front ends (engine/http.py HttpProtocol, engine/frontend.py
NativeConnection) are sinks that frame the outcome as an HTTP response; `LocalSink` is an
in-process one, for callers that are not a connection (an asyncio future per call).
"""
from __future__ import annotations

import asyncio
import random
import time
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Protocol

from . import oip
from .runtime import (
    STATUS_CANCELLED,
    STATUS_ERROR,
    STATUS_INVALID,
    STATUS_OK,
    STATUS_OVERLOADED,
    STATUS_QUEUE_FULL,
    STATUS_SHUTDOWN,
    STATUS_TIMEOUT,
)

if TYPE_CHECKING:
    from .runtime import ModelRunner


class Outcome(NamedTuple):
    """The answer to one infer call: `header_length` is the JSON header's length of a
    binary-extension body (None: the body is JSON)."""

    status: int
    body: bytes
    header_length: int | None = None


class Sink(Protocol):
    """Where an infer call's answer goes: a connection, or an in-process caller."""

    closed: bool
    outstanding: dict[int, Any]  # token → runner of the requests queued for it, to cancel them

    def answer(self, seq: int, outcome: Outcome) -> None: ...


# Batcher outcomes that are not success → (HTTP status, reason label for metrics).
FAILURES = {
    STATUS_QUEUE_FULL: (503, "rejected"),
    STATUS_TIMEOUT: (503, "timeout"),
    STATUS_SHUTDOWN: (503, "shutdown"),
    STATUS_ERROR: (500, "backend_error"),
    STATUS_CANCELLED: (503, "cancelled"),
}


def error(status: int, message: str) -> Outcome:
    return Outcome(status, oip.encode({"error": message}))


class InferCall:
    """One infer request waiting for its batch; `done` is called from the loop."""

    __slots__ = ("sink", "seq", "runner", "decoded", "token", "logged", "count_failure", "trace", "timings")

    def __init__(self, sink: Sink, seq: int, runner: ModelRunner, decoded: oip.DecodedInfer | None,
                 count_failure: Callable[[Any, str], None]):
        self.sink = sink
        self.seq = seq
        self.runner = runner
        self.decoded = decoded
        self.token = 0
        self.logged: tuple | None = None  # sampled for the prediction log: (start, body, JSON length)
        self.count_failure = count_failure
        self.trace: Any = None    # engine/tracing.py RequestTrace: sampled for tracing
        self.timings: Any = None  # the batcher's timings of a traced call (Batcher.take_traces)

    def done(self, status: int, payload: Any) -> None:
        sink = self.sink
        sink.outstanding.pop(self.token, None)
        if sink.closed:
            if self.trace is not None:
                self.trace.finish_infer(self.runner, None, 0, self.timings)
            return
        outcome = self.outcome(status, payload)
        sink.answer(self.seq, outcome)
        if self.trace is not None:
            self.trace.finish_infer(self.runner, outcome.status, self.decoded.rows if self.decoded else 0,
                                    self.timings)

    def outcome(self, status: int, payload: Any) -> Outcome:
        runner = self.runner
        if status == STATUS_OK:
            if runner.entity is not None and runner.entity.policy == "error":
                missing = runner.unknown_entities(self.decoded, payload)
                if missing:
                    self.count_failure(runner, "unknown_entity")
                    return error(404, f"model {runner.name!r}: unknown entity ids {missing[:20]} in the online store")
            if self.decoded is None:  # native JSON path: payload is the response body
                body, header_length = payload, None
            else:
                body, header_length = runner.encoder.encode(self.decoded, payload)
            if self.logged is not None:
                runner.log_prediction(self.token, *self.logged, body, header_length)
            return Outcome(200, body, header_length)
        http_status, reason = FAILURES.get(status, (500, "backend_error"))
        if status == STATUS_ERROR:
            message = f"model {runner.name!r} version {runner.version} failed: {payload}"
        elif status == STATUS_TIMEOUT:
            message = f"request for model {runner.name!r} timed out in the queue"
        else:
            message = f"request for model {runner.name!r} was not run: {payload}"
        self.count_failure(runner, reason)
        return error(http_status, message)


class Inference:
    """Queues infer calls in their model's batcher, or refuses them with the reason."""

    def __init__(self, count_failure: Callable[[Any, str], None], shed_queue_wait_ms: float):
        self.count_failure = count_failure
        self.shed_queue_wait_ms = shed_queue_wait_ms

    def submit(self, sink: Sink, seq: int, runner: ModelRunner, body: bytes, header_length: bytes | None,
               draining: bool = False, trace: Any = None) -> None:
        """Queue the call (its answer reaches `sink` when the batch completes), or answer a
        refusal now. `header_length`: the Inference-Header-Content-Length value of a
        binary-extension body; `trace`: the request's RequestTrace when it is traced (the
        batcher then times it). Raises oip.ProtocolError for a request the model cannot take."""
        if draining or not runner.ready:
            reason = "draining" if draining else runner.why_unavailable()
            raise oip.ProtocolError(f"model {runner.name!r} is not accepting requests ({reason})", 503)
        # Sampled for the prediction log: its start time (0.0: not sampled).
        sampled_at = (time.monotonic() if runner.prediction_log is not None
                      and random.random() < runner.prediction_log.sample_rate else 0.0)
        json_length = None
        if header_length is None and runner.json_fast:
            call = InferCall(sink, seq, runner, None, self.count_failure)
            if sampled_at:
                call.logged = (sampled_at, body, None)
            if trace is not None:
                call.trace = trace
                token = runner.submit_json(call, body, traced=True)
            else:
                token = runner.submit_json(call, body)
            if token:
                self._queued(sink, seq, runner, call, token)
                return
        elif header_length is not None:
            try:
                json_length = int(header_length)
            except ValueError:
                raise oip.ProtocolError("Inference-Header-Content-Length must be an integer") from None
        decoded = runner.decoder.decode(body, json_length)
        call = InferCall(sink, seq, runner, decoded, self.count_failure)
        if sampled_at:
            call.logged = (sampled_at, body, json_length)
        call.trace = trace
        try:
            token = runner.submit(call, decoded.data, decoded.rows, decoded.priority, decoded.timeout_us,
                                  trace is not None)
        except (ValueError, TypeError) as exc:
            raise oip.ProtocolError(str(exc)) from None
        self._queued(sink, seq, runner, call, token)

    def _queued(self, sink: Sink, seq: int, runner: ModelRunner, call: InferCall, token: int) -> None:
        """Record a queued request, or answer a refusal (token = minus the batcher status)."""
        if token > 0:
            call.token = token
            sink.outstanding[token] = runner
            if call.trace is not None:
                call.trace.claimed = True  # finished when answered
            return
        status = -token
        self.count_failure(runner, "rejected" if status in (STATUS_QUEUE_FULL, STATUS_OVERLOADED) else "bad_request")
        if status == STATUS_QUEUE_FULL:
            outcome = error(503, f"queue of model {runner.name!r} is full")
        elif status == STATUS_OVERLOADED:
            outcome = error(503, f"model {runner.name!r} is overloaded: its queue holds more than "
                                 f"{self.shed_queue_wait_ms:g} ms of work; retry later")
        elif status == STATUS_SHUTDOWN:
            outcome = error(503, f"model {runner.name!r} is shutting down")
        elif status == STATUS_INVALID:
            outcome = error(400, "invalid priority or timeout parameter")
        else:
            outcome = error(503, f"request refused (status {status})")
        sink.answer(seq, outcome)


class LocalSink:
    """An in-process caller's sink: each call's outcome resolves an asyncio future."""

    __slots__ = ("closed", "outstanding", "futures")

    def __init__(self) -> None:
        self.closed = False
        self.outstanding: dict[int, Any] = {}
        self.futures: dict[int, asyncio.Future] = {}

    def call(self, seq: int) -> asyncio.Future:
        future = self.futures[seq] = asyncio.get_running_loop().create_future()
        return future

    def answer(self, seq: int, outcome: Outcome) -> None:
        future = self.futures.pop(seq, None)
        if future is not None and not future.done():
            future.set_result(outcome)

    def cancel(self) -> None:
        """The caller gave up: drop its requests that have not run yet."""
        self.closed = True
        for token, runner in self.outstanding.items():
            runner.cancel(token)
        self.outstanding.clear()
