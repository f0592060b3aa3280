"""The server: routes, model table, lifecycle (start, SIGTERM drain, stop).

Routes (KServe v2 / Open Inference Protocol REST, plus Triton's extensions):

  GET  /v2/health/live | /v2/health/ready | /v2
  GET  /v2/models/{m}[/versions/{v}]            model metadata
  GET  /v2/models/{m}[/versions/{v}]/ready
  GET  /v2/models/{m}[/versions/{v}]/config     Triton model configuration (perf_analyzer)
  GET  /v2/models[/{m}[/versions/{v}]]/stats    Triton statistics extension
  GET  /v2/models/{m}[/versions/{v}]/drift      drift statistics against the reference profile
  POST /v2/models/{m}[/versions/{v}]/infer      JSON or binary tensor extension
  GET  /metrics                                 Prometheus text format
"""
from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import time
from typing import Any, Iterable

from vivace import __version__
from vivace.monitor.metrics import MetricsCollector, render_metrics

from . import oip
from .config import ServerConfig
from .http import HttpProtocol, InferCall, error_body, http_response
from .runtime import STATUS_INVALID, STATUS_QUEUE_FULL, STATUS_SHUTDOWN, ModelRunner

log = logging.getLogger("vivace.server")

TRITON_TYPES = {
    "BOOL": "TYPE_BOOL", "UINT8": "TYPE_UINT8", "UINT16": "TYPE_UINT16", "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64", "INT8": "TYPE_INT8", "INT16": "TYPE_INT16", "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64", "FP16": "TYPE_FP16", "BF16": "TYPE_BF16", "FP32": "TYPE_FP32",
    "FP64": "TYPE_FP64",
}
TRITON_PLATFORMS = {"torchscript": "pytorch_libtorch", "torch_export": "pytorch_libtorch"}


def _ok(obj: Any) -> bytes:
    return http_response(200, oip.encode(obj))


class App:
    """Holds the served models and answers every route."""

    def __init__(self, runners: Iterable[ModelRunner], config: ServerConfig):
        self.config = config
        self.models: dict[str, dict[str, ModelRunner]] = {}
        self.latest: dict[str, ModelRunner] = {}
        for runner in runners:
            self.add_model(runner)
        self.connections: set[HttpProtocol] = set()
        self.draining = False
        self.http_errors: dict[int, int] = {}
        self.failures: dict[tuple[str, str, str], int] = {}
        self.started_at = time.time()
        self._routes: dict[tuple[bytes, bytes], tuple[Any, ModelRunner | None]] = {}
        self.metrics = MetricsCollector(self)

    # -- model table --------------------------------------------------------------------
    def add_model(self, runner: ModelRunner) -> None:
        self.models.setdefault(runner.name, {})[runner.version] = runner
        current = self.latest.get(runner.name)
        if current is None or _version_key(runner.version) >= _version_key(current.version):
            self.latest[runner.name] = runner
        self._routes = {}

    def replace_model(self, old: ModelRunner, new: ModelRunner) -> None:
        """Route `old`'s name to `new` from now on; requests already queued on `old` finish there."""
        self.models[new.name] = {new.version: new}
        self.latest[new.name] = new
        self._routes = {}

    def runners(self) -> list[ModelRunner]:
        return [r for versions in self.models.values() for r in versions.values()]

    # -- accounting ---------------------------------------------------------------------
    def count_http_error(self, status: int) -> None:
        self.http_errors[status] = self.http_errors.get(status, 0) + 1

    def count_failure(self, runner: ModelRunner | None, reason: str) -> None:
        key = (runner.name, runner.version, reason) if runner else ("", "", reason)
        self.failures[key] = self.failures.get(key, 0) + 1

    # -- routing ------------------------------------------------------------------------
    def dispatch(self, protocol: HttpProtocol, seq: int, method: bytes, url: bytes, body: bytes) -> None:
        key = (method, url)
        route = self._routes.get(key)
        if route is None:
            try:
                route = self._resolve(method, url)
            except oip.ProtocolError as exc:
                self.count_http_error(exc.status)
                protocol.respond(seq, http_response(exc.status, error_body(str(exc))))
                return
            if len(self._routes) < 4096:  # only well-formed routes are cached
                self._routes[key] = route
        handler, runner = route
        try:
            handler(protocol, seq, runner, body)
        except oip.ProtocolError as exc:
            self.count_http_error(exc.status)
            if runner is not None:
                self.count_failure(runner, "bad_request")
            protocol.respond(seq, http_response(exc.status, error_body(str(exc))))
        except Exception as exc:  # a bug must cost one request, not the connection
            log.exception("internal error on %s %s", method, url)
            self.count_http_error(500)
            protocol.respond(seq, http_response(500, error_body(f"internal error: {exc}")))

    def _resolve(self, method: bytes, url: bytes):
        path = url.split(b"?", 1)[0].decode("latin-1")
        parts = [p for p in path.split("/") if p]
        if parts == ["metrics"]:
            return self._method(method, b"GET", self._metrics), None
        if not parts or parts[0] != "v2":
            raise oip.ProtocolError(f"no route for {path}", 404)
        rest = parts[1:]
        if not rest:
            return self._method(method, b"GET", self._server_metadata), None
        if rest in (["health", "live"], ["health", "ready"]):
            return self._method(method, b"GET", self._live if rest[1] == "live" else self._ready), None
        if rest == ["models", "stats"]:
            return self._method(method, b"GET", self._stats), None
        if len(rest) < 2 or rest[0] != "models":
            raise oip.ProtocolError(f"no route for {path}", 404)
        name = rest[1]
        versions = self.models.get(name)
        if versions is None:
            raise oip.ProtocolError(f"unknown model {name!r}", 404)
        tail = rest[2:]
        if len(tail) >= 2 and tail[0] == "versions":
            runner = versions.get(tail[1])
            if runner is None:
                raise oip.ProtocolError(f"unknown version {tail[1]!r} of model {name!r}", 404)
            tail = tail[2:]
        else:
            runner = self.latest[name]
        if not tail:
            return self._method(method, b"GET", self._model_metadata), runner
        if len(tail) == 1:
            action = {
                "infer": (b"POST", self._infer),
                "ready": (b"GET", self._model_ready),
                "config": (b"GET", self._model_config),
                "stats": (b"GET", self._stats),
                "drift": (b"GET", self._drift),
            }.get(tail[0])
            if action:
                return self._method(method, *action), runner
        raise oip.ProtocolError(f"no route for {path}", 404)

    @staticmethod
    def _method(method: bytes, allowed: bytes, handler):
        if method != allowed:
            raise oip.ProtocolError(f"method {method.decode('latin-1')} not allowed here; use {allowed.decode()}", 405)
        return handler

    # -- handlers -----------------------------------------------------------------------
    def _infer(self, protocol: HttpProtocol, seq: int, runner: ModelRunner, body: bytes) -> None:
        if self.draining or not runner.ready:
            raise oip.ProtocolError(f"model {runner.name!r} is not accepting requests (draining)", 503)
        header_length = protocol.header_length
        if header_length is None and runner.json_fast:
            call = InferCall(protocol, seq, runner, None)
            token = runner.submit_json(call, body)
            if token:
                self._queued(protocol, seq, runner, call, token)
                return
        elif header_length is not None:
            try:
                header_length = int(header_length)
            except ValueError:
                raise oip.ProtocolError("Inference-Header-Content-Length must be an integer") from None
        decoded = runner.decoder.decode(body, header_length)
        call = InferCall(protocol, seq, runner, decoded)
        try:
            token = runner.submit(call, decoded.data, decoded.rows, decoded.priority, decoded.timeout_us)
        except (ValueError, TypeError) as exc:
            raise oip.ProtocolError(str(exc)) from None
        self._queued(protocol, seq, runner, call, token)

    def _queued(self, protocol: HttpProtocol, seq: int, runner: ModelRunner, call: InferCall, token: int) -> None:
        """Record a queued request, or answer a refusal (token = minus the batcher status)."""
        if token > 0:
            call.token = token
            protocol.outstanding[token] = runner
            return
        status = -token
        self.count_failure(runner, "rejected" if status == STATUS_QUEUE_FULL else "bad_request")
        if status == STATUS_QUEUE_FULL:
            message, code = f"queue of model {runner.name!r} is full", 503
        elif status == STATUS_SHUTDOWN:
            message, code = f"model {runner.name!r} is shutting down", 503
        elif status == STATUS_INVALID:
            message, code = "invalid priority or timeout parameter", 400
        else:
            message, code = f"request refused (status {status})", 503
        extra = b"retry-after: 1\r\n" if code == 503 else b""
        protocol.respond(seq, http_response(code, error_body(message), extra=extra))

    def _live(self, protocol, seq, runner, body) -> None:
        protocol.respond(seq, http_response(200, b'{"live":true}'))

    def _ready(self, protocol, seq, runner, body) -> None:
        ready = not self.draining and all(r.ready for r in self.runners())
        protocol.respond(seq, http_response(200 if ready else 503, b'{"ready":%s}' % (b"true" if ready else b"false")))

    def _server_metadata(self, protocol, seq, runner, body) -> None:
        protocol.respond(seq, _ok({
            "name": "vivace",
            "version": __version__,
            "extensions": ["binary_tensor_data", "model_configuration", "statistics"],
        }))

    def _model_metadata(self, protocol, seq, runner: ModelRunner, body) -> None:
        package = runner.package
        protocol.respond(seq, _ok({
            "name": package.name,
            "versions": sorted(self.models[package.name], key=_version_key),
            "platform": TRITON_PLATFORMS.get(package.platform, package.platform),
            "inputs": [s.to_json() for s in package.inputs],
            "outputs": [s.to_json() for s in package.outputs],
        }))

    def _model_ready(self, protocol, seq, runner: ModelRunner, body) -> None:
        ready = runner.ready and not self.draining
        protocol.respond(seq, http_response(200 if ready else 503, b'{"ready":%s}' % (b"true" if ready else b"false")))

    def _model_config(self, protocol, seq, runner: ModelRunner, body) -> None:
        protocol.respond(seq, _ok(triton_config(runner)))

    def _stats(self, protocol, seq, runner: ModelRunner | None, body) -> None:
        runners = [runner] if runner is not None else self.runners()
        protocol.respond(seq, _ok({"model_stats": [triton_stats(r) for r in runners]}))

    def _drift(self, protocol, seq, runner: ModelRunner, body) -> None:
        if runner.drift is None:
            raise oip.ProtocolError(
                f"model {runner.name!r} version {runner.version} has no drift monitoring "
                "(its package carries no reference profile)", 404)
        protocol.respond(seq, _ok(runner.drift.status()))

    def _metrics(self, protocol, seq, runner, body) -> None:
        text, content_type = render_metrics(self.metrics)
        protocol.respond(seq, http_response(200, text, content_type))

    # -- lifecycle ----------------------------------------------------------------------
    def sweep(self) -> None:
        now = time.monotonic()
        for conn in list(self.connections):
            conn.sweep(now)

    def begin_drain(self) -> None:
        self.draining = True
        for conn in list(self.connections):
            conn.close_when_idle()

    def in_flight(self) -> int:
        return sum(len(c.outstanding) + len(c.held) for c in self.connections)


def _version_key(version: str):
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


def triton_config(runner: ModelRunner) -> dict[str, Any]:
    """The model configuration as Triton returns it (what perf_analyzer reads)."""
    package = runner.package
    dynamic_batching = package.manifest()["dynamic_batching"]
    dynamic_batching["default_queue_policy"]["timeout_action"] = "REJECT"  # the only action Vivace has

    def tensor(spec):
        return {"name": spec.name, "data_type": TRITON_TYPES[spec.datatype], "dims": list(spec.row_shape)}

    return {
        "name": package.name,
        "platform": TRITON_PLATFORMS.get(package.platform, package.platform),
        "backend": "pytorch" if package.platform in TRITON_PLATFORMS else package.platform,
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": package.max_batch_size,
        "input": [tensor(s) for s in package.inputs],
        "output": [tensor(s) for s in package.outputs],
        "dynamic_batching": dynamic_batching,
        "instance_group": [{"name": package.name, "kind": package.instance_kind, "count": package.instance_count}],
        "parameters": {k: {"string_value": str(v)} for k, v in package.parameters.items()},
    }


def triton_stats(runner: ModelRunner) -> dict[str, Any]:
    s = runner.stats()
    failures = sum(s["failures"].values())
    request_hist = s["histograms"]["request_seconds"]
    return {
        "name": runner.name,
        "version": runner.version,
        "last_inference": 0,
        "inference_count": s["inference_count"],
        "execution_count": s["execution_count"],
        "inference_stats": {
            "success": {"count": s["success"], "ns": int(request_hist[2] * 1e9)},
            "fail": {"count": failures, "ns": 0},
            "queue": {"count": s["success"], "ns": s["queue_ns"]},
            "compute_input": {"count": s["execution_count"], "ns": s["compute_input_ns"]},
            "compute_infer": {"count": s["execution_count"], "ns": s["compute_infer_ns"]},
            "compute_output": {"count": s["execution_count"], "ns": s["compute_output_ns"]},
        },
        "batch_stats": [],
    }


class AliasFollower:
    """Keeps a served `name@alias` on the version the alias points to.

    `current()` returns the version the registry resolves now; `load(version)` builds a
    runner for it (in a worker thread: loading a model must not stall the loop). When the
    alias moves - a promotion or a rollback - the new version takes new requests at once
    and the old one finishes what it had queued, then closes: no request fails.
    """

    def __init__(self, ref: str, runner: ModelRunner, current, load, interval: float = 1.0):
        self.ref = ref
        self.runner = runner
        self.current = current
        self.load = load
        self.interval = interval

    async def follow(self, app: App) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.interval)
            try:
                version = await loop.run_in_executor(None, self.current)
                if version == self.runner.version:
                    continue
                new = await loop.run_in_executor(None, self.load, version)
            except Exception as exc:  # the registry or the new package failed: keep serving
                log.error("%s: cannot follow to the new version: %s", self.ref, exc)
                continue
            old, self.runner = self.runner, new
            new.attach(loop)
            app.replace_model(old, new)
            log.info("%s moved: serving %s version %s (was %s)", self.ref, new.name, new.version, old.version)
            loop.create_task(_retire(old))


async def _retire(runner: ModelRunner) -> None:
    while runner.waiting:
        await asyncio.sleep(0.01)
    runner.close(drain=True)


async def serve(
    runners: list[ModelRunner],
    config: ServerConfig,
    ready: asyncio.Future | None = None,
    sock: socket.socket | None = None,
    followers: list[AliasFollower] = (),
) -> int:
    """Serve until SIGTERM/SIGINT, then drain: answer accepted requests, refuse new ones."""
    loop = asyncio.get_running_loop()
    app = App(runners, config)
    for runner in runners:
        runner.attach(loop)
    if sock is not None:
        server = await loop.create_server(lambda: HttpProtocol(app), sock=sock, backlog=4096)
    else:
        server = await loop.create_server(
            lambda: HttpProtocol(app), config.host, config.port, backlog=4096, reuse_port=True
        )
    stop = loop.create_future()

    def on_signal(signum: int) -> None:
        if not stop.done():
            log.info("signal %d: draining", signum)
            stop.set_result(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    tick = max(0.05, min(config.header_timeout, config.body_timeout, config.idle_timeout) / 4)

    async def sweeper() -> None:
        while True:
            await asyncio.sleep(tick)
            app.sweep()

    sweep_task = loop.create_task(sweeper())
    follow_tasks = [loop.create_task(f.follow(app)) for f in followers]
    # Start-up allocated a large heap (torch); freezing it keeps full collections from
    # scanning it and pausing the loop for tens of milliseconds under load.
    gc.collect()
    gc.freeze()
    port = server.sockets[0].getsockname()[1]
    log.info("vivace serving %s on http://%s:%d", ", ".join(f"{r.name}/{r.version}" for r in runners), config.host, port)
    if ready is not None and not ready.done():
        ready.set_result(port)
    try:
        await stop
    finally:
        server.close()  # stop accepting: new connections are refused from here on
        for task in follow_tasks:
            task.cancel()
        app.begin_drain()
        deadline = time.monotonic() + config.drain_timeout
        while app.in_flight() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            app.begin_drain()
        for runner in app.runners():
            runner.close(drain=True)
        for conn in list(app.connections):
            conn.transport.close()
        sweep_task.cancel()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    return 0
