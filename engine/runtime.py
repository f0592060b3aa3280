"""A served model: its package, backend and C++ batcher, wired to the event loop.

The loop submits rows (`submit`) and is woken once per completed batch: the batcher's
eventfd is registered with `loop.add_reader`, and `_on_completions` answers every request
that batch finished. Requests are identified by integer tokens; the waiting table maps a
token to the object whose `done(status, payload)` answers it.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import time
from dataclasses import dataclass, replace
from typing import Any, Protocol

import msgspec
import numpy as np

from vivace import _core
from vivace.datatypes import batch_datatype
from vivace.registry.package import ModelPackage, TensorSpec

from .backends import SignatureMismatch, load_backend
from .config import ServerConfig
from .oip import InferDecoder, ResponseEncoder
from .strings import STRINGS

# The longest an inline slice of batches may hold the loop (see Model._on_ready).
MAX_INLINE_SLICE_US = 20_000
STATUS_OK = int(_core.Status.OK)
STATUS_QUEUE_FULL = int(_core.Status.QUEUE_FULL)
STATUS_TIMEOUT = int(_core.Status.TIMEOUT)
STATUS_CANCELLED = int(_core.Status.CANCELLED)
STATUS_ERROR = int(_core.Status.ERROR)
STATUS_SHUTDOWN = int(_core.Status.SHUTDOWN)
STATUS_INVALID = int(_core.Status.INVALID)
STATUS_OVERLOADED = int(_core.Status.OVERLOADED)
JSON_DECLINED = 100  # submit_json: not for the fast path

log = logging.getLogger("vivace.runtime")
_tokens = itertools.count(1)  # unique across models, so a token names one request
FOUND_OUTPUT = "entity_found"
UNKNOWN_ENTITY_POLICIES = ("error", "default")


@dataclass
class EntityServing:
    """How a model is served by entity id (see ModelRunner)."""

    spec: Any          # features.store.ServingSpec
    width: int         # features per row, the model's input width
    policy: str        # "error": unknown ids get 404; "default": NaN features + entity_found


def _entity_signature(package: ModelPackage, home: str | None) -> tuple[ModelPackage, EntityServing]:
    """The served signature of a feature-service model: INT64 [-1, 1] named after the join
    key in; the model's outputs plus entity_found (BOOL [-1, 1]) out."""
    from vivace.features.store import FeatureStore

    service = package.metadata["feature_service"]
    policy = package.metadata.get("unknown_entity", "error")
    if policy not in UNKNOWN_ENTITY_POLICIES:
        raise ValueError(f"{package.name}: unknown_entity must be one of {UNKNOWN_ENTITY_POLICIES}, got {policy!r}")
    if len(package.inputs) != 1 or package.inputs[0].datatype != "FP32" or len(package.inputs[0].shape) != 2:
        raise ValueError(f"{package.name}: serving by entity id needs one FP32 [-1, F] model input")
    spec = FeatureStore(home or ".vivace").serving_spec(service)
    width = package.inputs[0].shape[1]
    if len(spec.features) != width:
        raise ValueError(
            f"{package.name}: feature service {service!r} has {len(spec.features)} features, "
            f"the model takes {width}"
        )
    served = replace(
        package,
        inputs=[TensorSpec(spec.join_key, "INT64", (-1, 1))],
        outputs=[*package.outputs, TensorSpec(FOUND_OUTPUT, "BOOL", (-1, 1))],
    )
    return served, EntityServing(spec, width, policy)


class Waiter(Protocol):
    def done(self, status: int, payload: Any) -> None: ...


class _FutureWaiter:
    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future):
        self.future = future

    def done(self, status: int, payload: Any) -> None:
        if not self.future.done():
            self.future.set_result((status, payload))


class ModelRunner:
    """One loaded model version, served through the C++ batcher."""

    def __init__(
        self,
        package: ModelPackage,
        device: str | None = None,
        num_threads: int | None = None,
        execution: str | None = None,
        home: str | None = None,
        shed_queue_wait_ms: float = ServerConfig.shed_queue_wait_ms,
        execution_timeout_s: float = ServerConfig.execution_timeout_s,
    ):
        self.model_package = package  # what the backend runs
        # Serving by entity id: a package that declares a feature service is called with the
        # entity's INT64 join key only; features are looked up natively in the batch path.
        self.entity = None
        if package.metadata.get("feature_service"):
            package, self.entity = _entity_signature(package, home)
        self.package = package  # what clients see: the served signature
        self.name = package.name
        self.version = package.version
        self.backend = load_backend(self.model_package, device=device, num_threads=num_threads)
        self.decoder = InferDecoder(package)
        self.encoder = ResponseEncoder(package)
        self.waiting: dict[int, Waiter] = {}
        self.tracing = False  # the server traces requests: hand traced calls their batch timings
        # BYTES tensors travel as handles (engine/strings.py): the inputs to turn into
        # handles at submit, each request's handles until the batcher has answered it, and
        # where the output handles sit in an answer's payload (offset per row, elements).
        self.strings = any(s.datatype == "BYTES" for s in (*package.inputs, *package.outputs))
        self._string_inputs = [i for i, s in enumerate(package.inputs) if s.datatype == "BYTES"]
        self._string_handles: dict[int, list[np.ndarray]] = {}
        offset, self._string_outputs = 0, []
        for s in package.outputs:
            if s.datatype == "BYTES":
                self._string_outputs.append((offset, s.row_elements))
            offset += s.row_bytes
        self.loop: asyncio.AbstractEventLoop | None = None
        self.execution_timeout_s = execution_timeout_s
        self.last_token = 0  # newest token submitted (requests up to it are older)
        # executor -> (start time, last_token at the start) of the batch it is running
        self.running: dict[int, tuple[float, int]] = {}
        self.hung = False  # a batch overran execution_timeout_s: refusing requests until it returns
        self._token_times: collections.deque[tuple[float, int]] = collections.deque()  # (time, last_token)
        db = package.dynamic_batching
        policy = db.default_queue_policy
        self._execute = None
        self.execution = execution or package.parameters.get("execution") or self.backend.preferred_execution
        if self.execution not in ("inline", "threads"):
            raise ValueError(f"execution must be 'inline' or 'threads', got {self.execution!r}")
        self._timer: asyncio.TimerHandle | None = None
        self._backlogged = False  # inline: the last slice left ready batches behind
        self._slice_end = 0.0
        self.drift = None  # a DriftMonitor once enable_drift() ran
        self.prediction_log = None  # a monitor.predlog.PredictionLogger: sampled requests are logged
        self.batcher = _core.Batcher(
            model_name=package.name,
            max_batch_size=package.max_batch_size,
            preferred_batch_sizes=db.preferred_batch_size,
            max_queue_delay_us=db.max_queue_delay_microseconds,
            priority_levels=db.priority_levels,
            default_priority=db.default_priority_level,
            default_timeout_us=policy.default_timeout_microseconds,
            allow_timeout_override=policy.allow_timeout_override,
            max_queue_size=policy.max_queue_size,
            shed_queue_wait_us=int(shed_queue_wait_ms * 1000),
            inputs=[(batch_datatype(s.datatype), list(s.row_shape)) for s in package.inputs],
            outputs=[(batch_datatype(s.datatype), list(s.row_shape)) for s in package.outputs],
            executors=package.instance_count,
            inline_execution=self.execution == "inline",
            execute=self._run_batch,
        )
        executors = range(1 if self.execution == "inline" else package.instance_count)
        inputs = [self.batcher.input_buffers(e) for e in executors]
        outputs = [self.batcher.output_buffers(e) for e in executors]
        if self.entity is not None:
            features = [np.zeros((package.max_batch_size, self.entity.width), np.float32) for _ in executors]
            self.batcher.attach_feature_lookup(self.entity.spec.lookup, features)
            inputs = [[memoryview(f).cast("B")] for f in features]
            outputs = [o[:-1] for o in outputs]  # the last output is the found flags
        self._execute = self.backend.batch_executor(inputs, outputs)
        # Why the model cannot serve (it failed warm-up), or None: it then stays out of
        # service, shown UNAVAILABLE with this reason (GET /v2/repository/index).
        self.unavailable_reason: str | None = self._warm_up(executors)
        if hasattr(self.backend, "reset_step_stats"):  # an ensemble's steps count requests, not warm-up
            self.backend.reset_step_stats()
        native = getattr(self.backend, "native_handle", None)
        # The kernel runs straight from the batch buffers: no Python, no GIL per batch.
        self.native_kernel = native is not None and self.entity is None
        if self.native_kernel:
            self.batcher.set_native_forward(*native(), self.backend)
        self.driven_natively = False  # the native HTTP front end's thread runs its batches
        # Plain JSON requests (no parameters, no binary tensors) are parsed and answered
        # natively when every datatype allows it; the rest take the general decoder. With
        # the "error" policy for unknown entities, answers are checked in Python first.
        self.json_fast = (self.entity is None or self.entity.policy == "default") and not self.strings and \
            self.batcher.enable_json(
            package.name,
            package.version,
            [(s.name, s.datatype, list(s.row_shape)) for s in package.inputs],
            [(s.name, s.datatype, list(s.row_shape)) for s in package.outputs],
        )
        self.ready = self.unavailable_reason is None
        self.closed = False

    def _warm_up(self, executors: range) -> str | None:
        """Run each executor's smallest and largest batch twice on zeros before serving.

        The first calls of a TorchScript module profile and re-optimise it (2-3x slower),
        and a CUDA backend captures a graph per batch size: paying that here keeps it off
        the first requests, including the first after an alias switch to a new version.
        Returns why the model cannot serve when its outputs contradict its signature
        (every request would fail); other failures are only logged, since zeros may be
        outside the model's domain.
        """
        for executor in executors:
            for rows in sorted({1, self.package.max_batch_size}):
                for _ in range(2):
                    try:
                        self._execute(executor, rows)
                        if self._string_outputs:  # no request reads these outputs: free them
                            self._release_strings(0, STATUS_OK, self._output_rows(executor, rows))
                    except SignatureMismatch as exc:
                        log.error("%s/%s: failed warm-up, not serving it: %s", self.name, self.version, exc)
                        return f"failed warm-up: {exc}"
                    except Exception as exc:  # noqa: BLE001 - zeros may be outside the model's domain
                        log.warning("%s/%s: warm-up batch of %d rows failed: %s", self.name, self.version, rows, exc)
                        return None
        return None

    def _output_rows(self, executor: int, rows: int) -> bytes:
        """The first `rows` rows of an executor's output buffers, laid out as an answer's payload."""
        return b"".join(bytes(buf[:rows * s.row_bytes])
                        for buf, s in zip(self.batcher.output_buffers(executor), self.package.outputs))

    def why_unavailable(self) -> str:
        """Why a runner that is not ready refuses requests."""
        if self.unavailable_reason:
            return self.unavailable_reason
        if self.hung:
            return f"a batch has run longer than {self.execution_timeout_s:g} s"
        return "closed" if self.closed else "draining"

    @property
    def has_profile(self) -> bool:
        """The package carries a reference profile of its training data (drift monitoring)."""
        package = self.model_package
        return (package.path / package.metadata.get("profile", "profile.json")).is_file()

    def enable_drift(self, interval_s: float = 5.0, window_rows: int = 10_000, alerts: Any = None) -> None:
        """Sketch every batch's inputs and predictions natively and check drift periodically."""
        from vivace.monitor.alerts import AlertConfig, DriftMonitor
        from vivace.monitor.sketch import Window, sketches_for_package

        # The model's own inputs are sketched: for entity-id serving, the looked-up features.
        inputs, predictions = sketches_for_package(self.model_package, Window.last_rows(window_rows))
        self.batcher.attach_sketches(inputs.native, predictions.native if predictions else None)
        self.drift = DriftMonitor(self.name, self.version, [s for s in (inputs, predictions) if s],
                                  config=alerts or AlertConfig())
        self.drift.start(interval_s)

    def quality_info(self) -> Any:
        """What the ground-truth monitor (monitor/quality.py) needs of this version: its task,
        columns, sensitive attributes and training-time importance, and a predictor for
        production importance — a model copy of its own (vivace.engine.Scorer, one thread),
        loaded on first use on the monitor's thread, never the batcher's buffers."""
        info = getattr(self, "_quality_info", None)
        if info is None:
            from vivace.monitor.quality import ModelInfo

            scorer: list[Any] = []

            def predict(x: np.ndarray) -> np.ndarray:
                if not scorer:
                    from .scorer import Scorer

                    scorer.append(Scorer(self.model_package, num_threads=1))
                out = scorer[0].predict(x.astype(np.float32))
                return np.asarray(next(iter(out.values())) if isinstance(out, dict) else out)

            info = self._quality_info = ModelInfo.from_package(
                self.name, self.version, self.package, None if self.entity is not None else predict)
        return info

    def _run_batch(self, executor: int, rows: int) -> None:
        self.running[executor] = (time.monotonic(), self.last_token)
        try:
            self._execute(executor, rows)
        finally:
            del self.running[executor]

    def check_hung(self, now: float) -> list[int]:
        """Watchdog, called periodically from the loop.

        When a batch has run longer than execution_timeout_s, the model is taken out of
        service (new requests get 503) and the tokens to fail are returned: the requests
        submitted before that batch started, and those that have waited longer than the
        timeout behind it. Not-yet-run ones are cancelled in the batcher. The model serves
        again once the batch returns; its late results are dropped.

        Batches run inline on the loop cannot be watched (the loop itself is blocked):
        a model that may hang needs execution "threads".
        """
        self._token_times.append((now, self.last_token))
        while len(self._token_times) > 2 and self._token_times[1][0] <= now - self.execution_timeout_s:
            self._token_times.popleft()
        overran = [token for started, token in list(self.running.values())
                   if now - started > self.execution_timeout_s]
        if not overran:
            if self.hung and not self.running:
                self.hung = False
                self.ready = not self.closed and self.unavailable_reason is None
            return []
        self.hung = True
        self.ready = False
        # The oldest sample is the newest token submitted at least one timeout ago.
        sampled_at, waited_long = self._token_times[0]
        newest = max(*overran, waited_long if sampled_at <= now - self.execution_timeout_s else 0)
        stuck = [token for token in self.waiting if token <= newest]
        for token in stuck:
            self.batcher.cancel(token)  # not yet run: never run it
        return stuck

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Have `loop` run (inline mode) and answer batches; call once, from the loop's thread."""
        self.loop = loop
        loop.add_reader(self.batcher.fileno(), self._on_completions)
        if self.execution == "inline":
            loop.add_reader(self.batcher.ready_fileno(), self._on_ready)

    @property
    def natively_drivable(self) -> bool:
        """Inline batches that need no Python: the native front end's thread can run them."""
        return self.native_kernel and self.execution == "inline" and not self.closed

    def drive_natively(self, native: bool) -> None:
        """Hand the running of batches to the native front end's thread (which then runs
        them right after reading their requests), or take it back to the loop."""
        if native == self.driven_natively or self.loop is None or self.closed:
            return
        self.driven_natively = native
        if native:
            self.loop.remove_reader(self.batcher.ready_fileno())
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        else:
            self.loop.add_reader(self.batcher.ready_fileno(), self._on_ready)
            self.loop.call_soon(self._on_ready)  # rows may have been queued meanwhile

    def _on_ready(self) -> None:
        """Inline mode: run the ready batches on the loop's thread, then answer them.

        The first row queued signals the descriptor, so by the time the loop gets here it
        has read every request that arrived in the same iteration: they form one batch.
        """
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # One slice of batches, then back to the loop: reading, accepting and refusing
        # requests must not wait behind the whole queue. While a backlog lasts, the batches
        # get at least as long as the loop spent on everything else since the last slice,
        # so a burst of new connections cannot slow the admitted queue down to a crawl.
        slice_us = _core.INLINE_SLICE_US
        if self._backlogged:
            away_us = int((time.monotonic() - self._slice_end) * 1e6)
            slice_us = min(max(slice_us, away_us), MAX_INLINE_SLICE_US)
        due_us = self.batcher.run_ready(slice_us)
        self._slice_end = time.monotonic()
        self._backlogged = due_us == 0
        self._on_completions()
        if due_us >= 0:  # more batches ready (0), or one waits for max_queue_delay or a timeout
            self._timer = self.loop.call_later(due_us / 1e6, self._on_ready)

    def _on_completions(self) -> None:
        waiting = self.waiting
        done = self.batcher.drain()
        if self.tracing:  # the timings of traced calls, handed to them before they answer
            for timings in self.batcher.take_traces():
                waiter = waiting.get(timings[0])
                if waiter is not None:
                    waiter.timings = timings
        for token, status, payload in done:
            waiter = waiting.pop(token, None)
            if waiter is not None:
                waiter.done(status, payload)
            if self.strings:
                self._release_strings(token, status, payload)

    def _release_strings(self, token: int, status: int, payload: Any) -> None:
        """The batcher has answered `token` (and the answer is encoded): free its strings."""
        handles = self._string_handles.pop(token, None)
        if handles:
            STRINGS.release(np.concatenate(handles))
        if status == STATUS_OK and self._string_outputs and payload:
            rows = len(payload) // sum(s.row_bytes for s in self.package.outputs)
            for offset, elements in self._string_outputs:
                STRINGS.release(np.frombuffer(payload, np.int64, rows * elements, offset * rows))

    def submit(self, waiter: Waiter, data: list[Any], rows: int, priority: int = 0, timeout_us: int = 0,
               traced: bool = False) -> int:
        """Queue a request: returns its token (> 0), or minus the batcher status when refused.

        Raises ValueError/TypeError when the data does not fit the signature.
        """
        token = next(_tokens)
        handles = None
        if self._string_inputs:
            data, handles = list(data), []
            for i in self._string_inputs:
                handles.append(STRINGS.put(data[i]))
                data[i] = handles[-1].tobytes()
        try:
            status = self.batcher.submit(token, data, rows, priority, timeout_us, traced)
        except BaseException:
            if handles:
                STRINGS.release(np.concatenate(handles))
            raise
        if status == STATUS_OK:
            self.waiting[token] = waiter
            self.last_token = token
            if handles:
                self._string_handles[token] = handles
            return token
        if handles:
            STRINGS.release(np.concatenate(handles))
        return -status

    def submit_json(self, waiter: Waiter, body: bytes, priority: int = 0, timeout_us: int = 0,
                    traced: bool = False) -> int:
        """Fast path for a JSON infer body: the token (> 0) when queued, 0 when the general
        decoder must handle the request, or minus the batcher status when refused."""
        token = next(_tokens)
        status = self.batcher.submit_json(token, body, priority, timeout_us, traced)
        if status == STATUS_OK:
            self.waiting[token] = waiter
            self.last_token = token
            return token
        return 0 if status == JSON_DECLINED else -status

    def log_prediction(self, token: int, started: float, request: bytes, request_json: int | None,
                       response: bytes, response_json: int | None) -> None:
        """Append a sampled request and its answer to the prediction log: the JSON parts of
        both (binary tensor contents are not logged), with the request id and latency."""
        latency = time.monotonic() - started
        try:
            sent = msgspec.json.decode(request[:request_json] if request_json is not None else request)
            answered = msgspec.json.decode(response[:response_json] if response_json is not None else response)
            request_id = sent.get("id") or f"{os.getpid()}-{token}"
            self.prediction_log.append(str(request_id), self.name, self.version, latency,
                                       sent.get("inputs"), answered.get("outputs"))
        except (OSError, ValueError) as exc:  # the audit trail must not fail the request it records
            log.error("%s/%s: cannot log a prediction: %s", self.name, self.version, exc)

    def unknown_entities(self, decoded: Any, payload: bytes) -> list[int]:
        """Entity ids of a finished request that the online store did not have (fresh)."""
        rows = decoded.rows
        found = np.frombuffer(payload, np.uint8)[-rows:]  # entity_found is the last output
        if found.all():
            return []
        keys = decoded.data[0]
        ids = np.frombuffer(keys, np.int64) if not isinstance(keys, list) else np.asarray(keys, np.int64)
        return ids.reshape(-1)[found == 0].tolist()

    def cancel(self, token: int) -> None:
        """The client went away: drop the request if it has not run yet."""
        self.batcher.cancel(token)

    async def infer(self, data: list[Any], rows: int, priority: int = 0, timeout_us: int = 0) -> tuple[int, Any]:
        """Submit from a coroutine and wait for (status, payload)."""
        future = asyncio.get_running_loop().create_future()
        token = self.submit(_FutureWaiter(future), data, rows, priority, timeout_us)
        if token < 0:
            return -token, None
        return await future

    def stats(self) -> dict[str, Any]:
        stats = self.batcher.stats()
        step_stats = getattr(self.backend, "step_stats", None)  # an ensemble: each step's own counts
        if step_stats is not None:
            stats["steps"] = step_stats()
        return stats

    def close(self, drain: bool = True) -> None:
        """Stop the batcher (running queued requests when drain) and answer what is left."""
        self.ready = False
        self.closed = True
        if self.drift is not None:
            self.drift.stop()
        if self._timer is not None:
            self._timer.cancel()
        self.batcher.shutdown(drain)
        if self.loop is not None and not self.loop.is_closed():
            self.loop.remove_reader(self.batcher.fileno())
            if self.execution == "inline":
                self.loop.remove_reader(self.batcher.ready_fileno())
        self._on_completions()
