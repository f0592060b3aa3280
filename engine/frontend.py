"""Python side of the native HTTP front end (csrc/frontend/).

The C++ front end owns the listening socket and every connection on one epoll thread. A
plain JSON infer request (no parameters, no binary tensors) to a model with a fast route
is parsed straight into the model's batcher and answered from C++ when its batch
completes: no Python runs per request, only once per batch (inline models) or not at all
(native kernels on executor threads). Every other request — metadata, health, metrics,
binary tensors, parameters, the admin routes, and any request whose error needs words —
is handed to this module, which runs it through the same `App.dispatch` as the Python
front end (engine/http.py) and sends the answer back; the C++ side keeps responses in
request order.

With `--auth`, the C++ side answers a fast-path request only when its bearer token is
valid and has the infer scope (it checks the SHA-256 digests `sync_tokens` hands it);
every other request goes through `App.dispatch`, which answers 401/403 and audits. The
Python front end (uvloop + httptools) remains for TLS, which the native one does not
implement (or a proxy terminates it): `ServerConfig.http_frontend` picks.
"""
from __future__ import annotations

import asyncio
import os
import socket
from typing import TYPE_CHECKING, Any

from vivace import _core

from .config import ServerConfig
from .http import http_answer
from .infer import Outcome
from .routes import OPEN_PATHS

if TYPE_CHECKING:
    from .runtime import ModelRunner
    from .server import App


def use_native(config: ServerConfig) -> bool:
    """Whether `config` serves through the native front end; raises ValueError when it
    asks for the native one together with a feature only the Python one has."""
    if config.http_frontend == "native" and config.tls_cert:
        raise ValueError("the native HTTP front end does not implement --tls-cert (terminate TLS in a proxy in "
                         "front of it, or use --http-frontend python or auto)")
    if config.http_frontend not in ("auto", "native", "python"):
        raise ValueError(f"http_frontend must be auto, native or python, got {config.http_frontend!r}")
    return config.http_frontend != "python" and not config.tls_cert


def listening_socket(config: ServerConfig, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket on config.host:port. SO_REUSEPORT only for `--workers`: a
    single server must not silently share its port with another one."""
    family, kind, proto, _, address = socket.getaddrinfo(
        config.host, config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(4096)
    except OSError as exc:
        sock.close()
        raise bind_error(config, exc) from None
    return sock


def bind_error(config: ServerConfig, exc: OSError) -> OSError:
    """The error of a failed bind, naming the address and port."""
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return OSError(exc.errno, f"cannot listen on {config.host}:{config.port}: {reason}")


class NativeConnection:
    """One connection of the native front end, as App.dispatch sees a protocol (the
    current request's headers, respond()) and an infer call its sink (engine/infer.py:
    the connection's queued tokens, answer())."""

    __slots__ = ("app", "core", "conn", "peer", "header_length", "authorization", "auth_cache", "outstanding", "closed",
                 "held", "traceparent", "tracestate", "received")

    def __init__(self, app: "App", core: Any, conn: int, peer: str | None):
        self.app = app
        self.core = core
        self.conn = conn
        self.peer = peer
        self.header_length: bytes | None = None
        self.authorization: bytes | None = None
        self.auth_cache: tuple | None = None
        self.outstanding: dict[int, ModelRunner] = {}  # token → runner, for cancellation
        self.closed = False
        self.held: dict[int, bytes] = {}  # always empty: the C++ side orders responses
        # W3C trace context of the current request, and when its first byte came (monotonic s)
        self.traceparent: bytes | None = None
        self.tracestate: bytes | None = None
        self.received = 0.0

    def respond(self, seq: int, data: bytes) -> None:
        if not self.closed:
            self.core.respond(self.conn, seq, data)

    def answer(self, seq: int, outcome: Outcome) -> None:
        self.respond(seq, http_answer(outcome))

    def lost(self) -> None:
        """The client went away: drop its requests that have not run yet."""
        self.closed = True
        for token, runner in self.outstanding.items():
            runner.cancel(token)
        self.outstanding.clear()


class NativeFrontend:
    """Runs the C++ front end for an App: hands it the fast routes, answers the rest."""

    def __init__(self, app: "App", sock: socket.socket):
        config = app.config
        self.app = app
        self.core = _core.HttpFrontend(
            sock.fileno(),
            max_connections=config.max_connections,
            max_body_bytes=config.max_body_bytes,
            max_header_bytes=config.max_header_bytes,
            max_headers=config.max_headers,
            header_timeout=config.header_timeout,
            body_timeout=config.body_timeout,
            idle_timeout=config.idle_timeout,
        )
        self.connections: dict[int, NativeConnection] = {}
        self._routed: tuple | None = None  # what the current fast routes were built from
        self._driven: list[ModelRunner] = []  # runners whose batches the C++ thread runs
        self._loop: asyncio.AbstractEventLoop | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self.core.fileno(), self._on_requests)

    def _on_requests(self) -> None:
        connections = self.connections
        dispatch = self.app.dispatch
        for conn, seq, method, target, body, header_length, authorization, peer, trace in self.core.take():
            connection = connections.get(conn)
            if seq < 0:  # the connection closed
                if connection is not None:
                    del connections[conn]
                    connection.lost()
                continue
            if connection is None:
                connection = connections[conn] = NativeConnection(self.app, self.core, conn, peer)
            connection.header_length = header_length
            connection.authorization = authorization
            if trace is None:
                connection.traceparent = connection.tracestate = None
                connection.received = 0.0
            else:
                connection.traceparent, connection.tracestate, received_ns = trace
                connection.received = received_ns / 1e9
            dispatch(connection, seq, method, target, body)

    def sync_tokens(self) -> None:
        """Give the C++ side the tokens that may call infer (with --auth): it answers their
        fast-route requests itself and hands every other to Python, which explains the 401
        or 403 and audits it. Called at start and whenever the token file changed."""
        auth = self.app.auth
        self.core.set_auth(auth is not None, auth.grants() if auth is not None else [],
                           sorted(path.decode() for path in OPEN_PATHS))

    def sync_routes(self) -> None:
        """Give the C++ side the fast routes of the models that take them now (`_fast`).
        Cheap when nothing changed."""
        app = self.app
        # A name under a rollout keeps its unversioned infer route on the Python path, which
        # picks the version per request (engine/rollout.py), unless the split is a plain
        # weighted one (no sticky key, no shadow) between two fast-routed versions: then
        # the C++ side draws the version per request itself.
        splits = app.table.splits
        serving = [(name, runner, runner is app.latest.get(name) and name not in splits)
                   for name, versions in app.models.items() for runner in versions.values()]
        key = (tuple((id(runner), runner.ready, runner.prediction_log is None, latest) for _, runner, latest in serving),
               tuple((name, id(split), split.weight) for name, split in splits.items()))
        if key == self._routed:
            return
        self.take_routed()  # the counts of the split routes about to be replaced
        self._routed = key
        routes: list = []
        for name, runner, latest in serving:
            if not _fast(runner):
                continue
            targets = [f"/v2/models/{name}/versions/{runner.version}/infer"]
            if latest:
                targets.append(f"/v2/models/{name}/infer")
            routes += [(target, runner.batcher, name, runner.version) for target in targets]
        for name, split in splits.items():
            canary = split.canary
            if canary is not None and not split.sticky and split.shadow is None and _fast(split.stable) \
                    and _fast(canary):
                routes.append((f"/v2/models/{name}/infer", split.stable.batcher, name, split.stable.version,
                               canary.batcher, canary.version, float(split.weight)))
        self.core.set_routes(routes)
        # Models served by a native kernel inline have their batches run by the C++ thread
        # right after it reads their requests: no hand-off to the loop per batch.
        routed = {id(route[1]) for route in routes} | {id(route[4]) for route in routes if len(route) == 7}
        driven = [runner for _, runner, _ in serving if runner.natively_drivable and id(runner.batcher) in routed]
        for runner in self._driven:
            if runner not in driven:
                runner.drive_natively(False)
        self.core.set_driven([runner.batcher for runner in driven])
        for runner in driven:
            runner.drive_natively(True)
        self._driven = driven

    def take_routed(self) -> None:
        """Add the requests the C++ side routed for weighted rollouts to their splits' counts."""
        splits = self.app.table.splits
        for target, stable, canary in self.core.take_routed():
            split = splits.get(target.split("/")[3])  # /v2/models/{name}/infer
            if split is None or split.canary is None:
                continue  # a rollout already ended: its counts went with it
            for runner, count in ((split.stable, stable), (split.canary, canary)):
                if count:
                    split.routed[runner.version] = split.routed.get(runner.version, 0) + count

    def set_tracing(self, on: bool, ratio: float) -> None:
        self.core.set_tracing(on, ratio)

    def take_trace_spans(self, epoch_offset_ns: int) -> tuple[bytes, int, int, int]:
        """(encoded spans, their count, traced requests, dropped requests) since the last call."""
        return self.core.take_trace_spans(epoch_offset_ns)

    # -- accounting (merged into the App's counters for /metrics) ---------------------------
    def http_errors(self) -> dict[int, int]:
        return self.core.http_errors()

    def failures(self) -> dict[tuple[str, str, str], int]:
        return self.core.failures()

    # -- lifecycle ----------------------------------------------------------------------
    def stop_accepting(self) -> None:
        self.core.stop_accepting()

    def begin_drain(self) -> None:
        # Fast routes stay: the C++ side reads only what was sent before the drain (and the
        # request a connection is still sending) and answers it.
        self.core.begin_drain()

    def in_flight(self) -> int:
        return self.core.in_flight() + sum(len(c.outstanding) for c in self.connections.values())

    def close(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self.core.fileno())
        self.core.set_driven([])
        for runner in self._driven:
            runner.drive_natively(False)
        self._driven = []
        self.core.stop()
        for connection in self.connections.values():
            connection.lost()
        self.connections.clear()


def _fast(runner) -> bool:
    """A runner whose JSON requests the C++ side may answer by itself: JSON fast path on,
    ready, no prediction log (sampling needs the Python path), and inline or a native
    kernel (Python models on executor threads stay on the Python path: the watchdog fails
    a hung batch's requests from there, engine/runtime.py check_hung)."""
    return bool(runner.json_fast and runner.ready and runner.prediction_log is None
                and (runner.execution == "inline" or runner.native_kernel))
