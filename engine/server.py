"""The server: the App that answers requests, and its lifecycle (start, SIGTERM drain, stop).

The routes are declared in engine/routes.py (the App answers each with the method the
table names); the served models live in engine/model_table.py. With `--auth`, every route
but the health checks needs a bearer token whose scopes allow it (engine/auth.py); admin
actions and refused requests go to the audit log.
"""
from __future__ import annotations

import asyncio
import functools
import gc
import logging
import signal
import socket
import ssl
import time
from typing import Any, Callable, Iterable

import msgspec

from vivace import __version__, datatypes
from vivace.monitor.metrics import MetricsCollector, render_metrics
from vivace.registry.models import ProtectedAlias

from . import oip, routes
from .auth import AuditLog, Authenticator, Principal
from .config import ServerConfig
from .frontend import NativeConnection, NativeFrontend, listening_socket, use_native
from .http import Acceptor, HttpProtocol, error_body, http_response
from .infer import Inference, LocalSink, Outcome
from .infer import error as infer_error
from .model_table import AliasFollower, ModelTable, registry_follower, version_key
from .rollout import Counts, Split, TeeSink, judge
from .routes import OPEN_PATHS
from .runtime import ModelRunner
from .tracing import DRAIN_INTERVAL_S, RequestTrace, ServerTracing

log = logging.getLogger("vivace.server")

# How often the token file is checked for changes: its own short timer, not the sweep's
# (which follows the HTTP timeouts and may tick every few seconds).
TOKEN_RELOAD_S = 0.2
# How often automatic rollouts are judged: likewise a timer of their own.
ROLLOUT_ANALYSIS_S = 0.25
# Feedback uploads written and joined at once (more: 503 + Retry-After).
MAX_FEEDBACK_JOBS = 4

# Vivace platform -> (Triton platform, Triton backend) in model metadata and /config.
TRITON_PLATFORMS = {"torchscript": "pytorch_libtorch", "torch_export": "pytorch_libtorch",
                    "onnxruntime": "onnxruntime_onnx"}
TRITON_BACKENDS = {"torchscript": "pytorch", "torch_export": "pytorch"}


class RepositoryRequest(msgspec.Struct, forbid_unknown_fields=True):
    parameters: dict[str, Any] = msgspec.field(default_factory=dict)


_repository_request = msgspec.json.Decoder(RepositoryRequest)


def _ok(obj: Any) -> bytes:
    return http_response(200, oip.encode(obj))


class App:
    """Answers every route of `ROUTES` for the models of its `ModelTable`."""

    def __init__(
        self,
        runners: Iterable[ModelRunner],
        config: ServerConfig,
        loader: Callable[[str], ModelRunner] | None = None,
        home: str | None = None,
        leader: bool = True,
    ):
        self.config = config
        self.loader = loader  # registry reference -> new runner (repository load)
        self.home = home
        # The one process of a --workers server that acts on its own judgements (automatic
        # rollout steps), as worker 0 alone fires drift alerts.
        self.leader = leader
        self.auth = Authenticator(config.auth_tokens) if config.auth_tokens else None
        self.audit_log = AuditLog(config.audit_log) if config.audit_log else None
        self._token_error: str | None = None  # the last failure to reload the token file, logged once
        self.frontend: NativeFrontend | None = None  # set by serve() when the C++ front end runs
        # (method, url) -> (handler, runner or None, scope needed or None): resolved routes
        self._routes: dict[tuple[bytes, bytes], tuple[Any, ModelRunner | None, str | None]] = {}
        self.table = ModelTable(on_change=self._models_changed)
        for runner in runners:
            self.table.add(runner)
        self.connections: set[HttpProtocol] = set()
        self.draining = False
        self._http_errors: dict[int, int] = {}
        self._failures: dict[tuple[str, str, str], int] = {}
        self.inference = Inference(self.count_failure, config.shed_queue_wait_ms)
        # Shadow copies and automatic rollout decisions in flight (referenced until done).
        self._background: set[asyncio.Task] = set()
        self.quality: Any = None  # a monitor.quality.QualityMonitor with --prediction-log: labels are joined
        self._feedback_jobs = 0  # feedback uploads being written and joined off the loop
        self.metrics = MetricsCollector(self)
        # --trace-endpoint: requests that reach Python are sampled in dispatch (the native
        # front end samples its fast path itself, engine/tracing.py); off, dispatch is untouched.
        self.tracing: ServerTracing | None = None
        self._trace: RequestTrace | None = None  # the traced request being dispatched
        if config.trace_endpoint:
            self.tracing = ServerTracing(config)
            self.dispatch = self._dispatch_traced  # type: ignore[method-assign]

    # -- the served models (engine/model_table.py) -------------------------------------------
    @property
    def models(self) -> dict[str, dict[str, ModelRunner]]:
        return self.table.models

    @property
    def latest(self) -> dict[str, ModelRunner]:
        return self.table.latest

    def runners(self) -> list[ModelRunner]:
        return self.table.runners()

    def _models_changed(self) -> None:
        self._routes = {}
        if self.frontend is not None:
            self.frontend.sync_routes()

    def rollouts(self) -> list[dict[str, Any]]:
        """The status of each rollout being served (for /metrics)."""
        if self.frontend is not None:
            self.frontend.take_routed()
        return [split.status() for split in self.table.splits.values()]

    # -- accounting ---------------------------------------------------------------------
    def count_http_error(self, status: int) -> None:
        self._http_errors[status] = self._http_errors.get(status, 0) + 1

    def count_failure(self, runner: ModelRunner | None, reason: str) -> None:
        key = (runner.name, runner.version, reason) if runner else ("", "", reason)
        self._failures[key] = self._failures.get(key, 0) + 1

    @property
    def http_errors(self) -> dict[int, int]:
        """Error responses by HTTP status, from Python and from the native front end."""
        return _merged(self._http_errors, self.frontend.http_errors() if self.frontend else {})

    @property
    def failures(self) -> dict[tuple[str, str, str], int]:
        """Failed requests by (model, version, reason), from both front ends."""
        return _merged(self._failures, self.frontend.failures() if self.frontend else {})

    # -- routing ------------------------------------------------------------------------
    def dispatch(self, protocol: HttpProtocol, seq: int, method: bytes, url: bytes, body: bytes) -> None:
        key = (method, url)
        route = self._routes.get(key)
        if route is None:
            # With auth on, who may ask comes before what exists: an unauthenticated client
            # learns nothing about the served models from 404s.
            if (self.auth is not None and url.split(b"?", 1)[0] not in OPEN_PATHS
                    and self._authenticate(protocol, seq, method, url) is None):
                return
            try:
                route = self._resolve(method, url)
            except oip.ProtocolError as exc:
                self.count_http_error(exc.status)
                protocol.respond(seq, http_response(exc.status, error_body(str(exc)), extra=exc.headers))
                return
            if len(self._routes) < 4096 and route[2] != "admin":  # well-formed model routes only
                self._routes[key] = route
        handler, runner, scope = route
        if scope is not None and self.auth is not None and not self._authorized(protocol, seq, scope, method, url):
            return
        try:
            handler(protocol, seq, runner, body)
        except oip.ProtocolError as exc:
            self.count_http_error(exc.status)
            if runner is not None:
                self.count_failure(runner, "bad_request")
            protocol.respond(seq, http_response(exc.status, error_body(str(exc)), extra=exc.headers))
        except Exception as exc:  # a bug must cost one request, not the connection
            log.exception("internal error on %s %s", method, url)
            self.count_http_error(500)
            protocol.respond(seq, http_response(500, error_body(f"internal error: {exc}")))

    def _dispatch_traced(self, protocol: HttpProtocol, seq: int, method: bytes, url: bytes, body: bytes) -> None:
        """dispatch, with tracing on: a sampled request's trace is current while its
        handler runs (an infer call takes it to its completion); others finish here."""
        assert self.tracing is not None
        received = protocol.received
        trace = self.tracing.begin(protocol.traceparent, protocol.tracestate, int(received * 1e9) if received else 0,
                                   method, url, "native" if self.frontend is not None else "python")
        if trace is None:
            App.dispatch(self, protocol, seq, method, url, body)
            return
        self._trace = trace
        try:
            App.dispatch(self, protocol, seq, method, url, body)
        finally:
            self._trace = None
            if not trace.claimed:
                trace.finish()

    def _authenticate(self, protocol: HttpProtocol, seq: int, method: bytes, url: bytes) -> Principal | None:
        """The principal of the request's bearer token, or None after answering 401."""
        header = protocol.authorization
        cached = protocol.auth_cache
        if cached is not None and cached[0] == header and cached[1] == self.auth.generation:
            principal = cached[2]
            if principal.expires_at is not None and time.time() >= principal.expires_at:
                principal = self.auth.authenticate(header)  # names the expiry
        else:
            principal = self.auth.authenticate(header)
        if isinstance(principal, str):
            protocol.auth_cache = None
            self._refuse(protocol, seq, 401, principal, method, url, None,
                         extra=b'www-authenticate: Bearer realm="vivace"\r\n')
            return None
        protocol.auth_cache = (header, self.auth.generation, principal)
        return principal

    def _authorized(self, protocol: HttpProtocol, seq: int, scope: str, method: bytes, url: bytes) -> bool:
        """Check the request's bearer token against the route's scope; answer 401/403 if not."""
        principal = self._authenticate(protocol, seq, method, url)
        if principal is None:
            return False
        if scope not in principal.scopes:
            self._refuse(protocol, seq, 403, f"token {principal.name!r} lacks the {scope!r} scope this route needs",
                         method, url, principal)
            return False
        return True

    def _refuse(self, protocol: HttpProtocol, seq: int, status: int, message: str, method: bytes, url: bytes,
                principal: Principal | None, extra: bytes = b"") -> None:
        self.count_http_error(status)
        self.record("auth.denied" if status == 401 else "auth.forbidden", status=status, reason=message,
                    token=principal.name if principal else None, remote=_peer(protocol),
                    method=method.decode("latin-1"), path=url.decode("latin-1")[:512])
        protocol.respond(seq, http_response(status, error_body(message), extra=extra))

    def record(self, event: str, **fields: Any) -> None:
        """Append a security event (authentication failure, admin action) to the audit log."""
        if self.audit_log is not None:
            try:
                self.audit_log.record(event, **fields)
            except (OSError, ValueError) as exc:  # a full disk must not take the server down
                log.error("audit log: cannot record %s: %s", event, exc)
        if event.startswith("admin."):
            log.info("audit %s %s", event, fields)

    def _resolve(self, method: bytes, url: bytes):
        """(handler, runner or None, scope needed or None) for a request line."""
        path = url.split(b"?", 1)[0].decode("latin-1")
        found = routes.match(path)
        if found is None:
            parts = [p for p in path.split("/") if p]
            if parts[:2] == ["v2", "models"] and len(parts) > 2 and parts[2] not in self.table.models:
                raise oip.ProtocolError(f"unknown model {parts[2]!r}", 404)
            raise oip.ProtocolError(f"no route for {path}", 404)
        by_method, params = found
        route = by_method.get(method.decode("latin-1"))
        if route is None:
            allowed = ", ".join(by_method)
            raise oip.ProtocolError(f"method {method.decode('latin-1')} not allowed here; use {allowed}", 405,
                                    b"allow: %s\r\n" % allowed.encode())
        handler = getattr(self, route.handler)
        if route.admin:
            if not self.config.repository_control:
                raise oip.ProtocolError("model control is off: start vivace serve with --repository-control "
                                        "to load, unload or move aliases over HTTP", 403)
            return functools.partial(handler, params["model_name"]), None, route.scope
        runner = self._runner(params["model_name"], params.get("model_version")) if route.model else None
        if route.handler == "_feedback":  # labels for a versioned route join that version's predictions only
            handler = functools.partial(handler, params.get("model_version"))
        if route.handler == "_infer" and "model_version" not in params:
            split = self.table.splits.get(params["model_name"])
            if split is not None:  # a rollout picks the version per request
                handler = functools.partial(self._infer_split, split)
        return handler, runner, route.scope

    def _runner(self, name: str, version: str | None) -> ModelRunner:
        """The served runner of model `name` (its latest version when `version` is None)."""
        versions = self.table.models.get(name)
        if versions is None:
            raise oip.ProtocolError(f"unknown model {name!r}", 404)
        runner = self.table.latest[name] if version is None else versions.get(version)
        if runner is None:
            raise oip.ProtocolError(f"unknown version {version!r} of model {name!r}", 404)
        return runner

    # -- handlers -----------------------------------------------------------------------
    def _infer(self, protocol: HttpProtocol, seq: int, runner: ModelRunner, body: bytes) -> None:
        self.inference.submit(protocol, seq, runner, body, protocol.header_length, self.draining, self._trace)

    def _infer_split(self, split: Split, protocol: HttpProtocol, seq: int, runner: ModelRunner, body: bytes) -> None:
        """Infer on the version the rollout routes this request to; a sampled share is
        also copied to the shadow version, whose answer is compared, never returned."""
        target = split.choose(body)
        if not split.shadows():
            self.inference.submit(protocol, seq, target, body, protocol.header_length, self.draining, self._trace)
            return
        tee = TeeSink(protocol)
        self.inference.submit(tee, seq, target, body, protocol.header_length, self.draining, self._trace)
        task = asyncio.get_running_loop().create_task(
            self._shadow(split, tee, body, protocol.header_length, target.version))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _shadow(self, split: Split, tee: TeeSink, body: bytes, header_length: bytes | None,
                      answered_by: str) -> None:
        shadow = split.shadow
        assert shadow is not None
        started = time.monotonic()
        copy = await self.infer(shadow.name, body, shadow.version,
                                None if header_length is None else int(header_length))
        copy_s = time.monotonic() - started
        primary, primary_s = await tee.answered
        compared = split.compare(primary, primary_s, copy, copy_s)
        if shadow.prediction_log is not None:  # every compared copy, with both latencies
            self._log_shadow(shadow, body, header_length, copy, copy_s, answered_by, primary_s, compared)

    @staticmethod
    def _log_shadow(shadow: ModelRunner, body: bytes, header_length: bytes | None, copy: Outcome, copy_s: float,
                    answered_by: str, primary_s: float, compared: tuple[float, int] | None) -> None:
        """A prediction-log record of a shadow copy: its answer, its latency and the answered
        version's, and how the two differed (the request itself is in the answered version's
        records when sampled)."""
        try:
            sent = msgspec.json.decode(body[:int(header_length)] if header_length is not None else body)
            got = msgspec.json.decode(copy.body[:copy.header_length] if copy.header_length is not None else copy.body)
            shadow.prediction_log.append(
                str(sent.get("id") or f"shadow-{id(body)}"), shadow.name, shadow.version, copy_s, None,
                got.get("outputs"), shadow_of=answered_by, answered_latency_s=primary_s, shadow_status=copy.status,
                max_abs_diff=None if compared is None else compared[0],
                label_disagreement=None if compared is None else compared[1])
        except (OSError, ValueError, AttributeError) as exc:  # the record must not fail the request it describes
            log.error("%s/%s: cannot log a shadow comparison: %s", shadow.name, shadow.version, exc)

    async def infer(self, model: str, body: bytes, version: str | None = None,
                    header_length: int | None = None) -> Outcome:
        """Answer one infer request in-process, without a connection (a caller that is not
        an HTTP client): the same batcher, refusals, metrics and prediction log as over
        HTTP. `header_length`: the JSON header's length of a binary-extension body."""
        sink = LocalSink()
        answered = sink.call(0)
        try:
            runner = self._runner(model, version)
            self.inference.submit(sink, 0, runner, body, None if header_length is None else b"%d" % header_length,
                                  self.draining)
        except oip.ProtocolError as exc:
            self.count_http_error(exc.status)
            return infer_error(exc.status, str(exc))
        try:
            return await answered
        except asyncio.CancelledError:
            sink.cancel()
            raise

    def _live(self, protocol, seq, runner, body) -> None:
        protocol.respond(seq, http_response(200, b'{"live":true}'))

    def _ready(self, protocol, seq, runner, body) -> None:
        # A model out of service (its backend hangs, or it failed warm-up) does not take the
        # others down with it: its own /ready says 503, the server's stays 200.
        ready = not self.draining and all(r.ready or r.hung or r.unavailable_reason for r in self.runners())
        protocol.respond(seq, http_response(200 if ready else 503, b'{"ready":%s}' % (b"true" if ready else b"false")))

    def _server_metadata(self, protocol, seq, runner, body) -> None:
        protocol.respond(seq, _ok({
            "name": "vivace",
            "version": __version__,
            "extensions": ["binary_tensor_data", "model_configuration", "statistics"],
        }))

    def _model_metadata(self, protocol, seq, runner: ModelRunner, body) -> None:
        package = runner.package
        metadata = {
            "name": package.name,
            "versions": self.table.versions(package.name),
            "platform": TRITON_PLATFORMS.get(package.platform, package.platform),
            "inputs": [s.to_json() for s in package.inputs],
            "outputs": [s.to_json() for s in package.outputs],
        }
        features = package.metadata.get("features")
        if features:  # a model `vivace train` made: its input columns, in order, and category codes
            metadata["parameters"] = {"features": features}
        protocol.respond(seq, _ok(metadata))

    def _model_ready(self, protocol, seq, runner: ModelRunner, body) -> None:
        ready = runner.ready and not self.draining
        protocol.respond(seq, http_response(200 if ready else 503, b'{"ready":%s}' % (b"true" if ready else b"false")))

    def _model_config(self, protocol, seq, runner: ModelRunner, body) -> None:
        protocol.respond(seq, _ok(triton_config(runner)))

    def _stats(self, protocol, seq, runner: ModelRunner | None, body) -> None:
        runners = [runner] if runner is not None else self.runners()
        families = list(self.metrics.collect())
        samples, steps = model_samples(families), step_samples(families)
        protocol.respond(seq, _ok({"model_stats": [triton_stats(r, samples, steps) for r in runners]}))

    def _rollout(self, protocol, seq, runner: ModelRunner, body) -> None:
        split = self.table.splits.get(runner.name)
        if split is None:  # no rollout: every request goes to the latest (or followed) version
            status = {"ref": None, "stable": self.table.latest[runner.name].version, "canary": None, "weight": 0.0,
                      "sticky": "", "routed": {}, "shadow": None}
        else:
            if self.frontend is not None:
                self.frontend.take_routed()
            status = split.status()
        protocol.respond(seq, _ok(status))

    def _drift(self, protocol, seq, runner: ModelRunner, body) -> None:
        if runner.drift is None:
            raise oip.ProtocolError(
                f"model {runner.name!r} version {runner.version} has no drift monitoring "
                "(its package carries no reference profile)", 404)
        protocol.respond(seq, _ok(runner.drift.status()))

    # -- ground truth (monitor/quality.py) ----------------------------------------------------
    def _feedback(self, version: str | None, protocol, seq, runner: ModelRunner, body) -> None:
        """Labels for logged requests: validated whole here (nothing is applied from an
        invalid body), then written to the feedback log and joined off the loop."""
        if self.quality is None:
            raise oip.ProtocolError(f"model {runner.name!r}: this server keeps no prediction log to join labels "
                                    "to; start vivace serve with --prediction-log FILE", 404)
        from vivace.monitor.quality import FeedbackError, parse_feedback

        try:
            items = parse_feedback(body)
        except FeedbackError as exc:
            raise oip.ProtocolError(str(exc), exc.status) from None
        if self.draining:
            raise oip.ProtocolError("the server is draining", 503)
        if self._feedback_jobs >= MAX_FEEDBACK_JOBS:  # a flood waits at the client, not in memory here
            raise oip.ProtocolError(f"{self._feedback_jobs} feedback uploads are being recorded; retry shortly",
                                    503, b"retry-after: 1\r\n")
        self._feedback_jobs += 1

        def done(future: asyncio.Future) -> None:
            self._feedback_jobs -= 1
            try:
                answer = future.result()
            except Exception as exc:  # noqa: BLE001 - e.g. a full disk: nothing was acknowledged
                log.error("%s: cannot record feedback: %s", runner.name, exc)
                self.count_http_error(503)
                protocol.respond(seq, http_response(503, error_body(f"cannot record the labels: {exc}"),
                                                    extra=b"retry-after: 5\r\n"))
                return
            protocol.respond(seq, _ok(answer))

        asyncio.get_running_loop().run_in_executor(
            None, functools.partial(self.quality.feedback, runner.name, version, items)).add_done_callback(done)

    def _performance(self, protocol, seq, runner: ModelRunner, body) -> None:
        if self.quality is None:
            doc = {"model": runner.name, "version": runner.version, "state": "off", "labels": 0, "metrics": {},
                   "reason": "no prediction log to join labels to (vivace serve --prediction-log FILE)"}
        else:
            doc = self.quality.performance(runner.name, runner.version)
        protocol.respond(seq, _ok(doc))

    def _metrics(self, protocol, seq, runner, body) -> None:
        text, content_type = render_metrics(self.metrics)
        protocol.respond(seq, http_response(200, text, content_type))

    def _openapi(self, protocol, seq, runner, body) -> None:
        from .openapi import document

        protocol.respond(seq, _ok(document(self)))

    # -- model repository (Triton's extension, plus alias moves) --------------------------
    def _repository_index(self, protocol, seq, runner, body) -> None:
        protocol.respond(seq, _ok([
            {"name": r.name, "version": r.version, "state": "READY" if r.ready else "UNAVAILABLE",
             "reason": "" if r.ready else "draining" if self.draining else r.why_unavailable()}
            for r in sorted(self.runners(), key=lambda r: (r.name, version_key(r.version)))
        ]))

    @staticmethod
    def _parameters(body: bytes) -> dict[str, Any]:
        if not body.strip():
            return {}
        try:
            return _repository_request.decode(body).parameters
        except msgspec.DecodeError as exc:
            raise oip.ProtocolError(f'the body must be a JSON object like {{"parameters": {{...}}}}: {exc}') from None

    def _admin_task(self, protocol: HttpProtocol, seq: int, event: str, fields: dict[str, Any], work, finish) -> None:
        """Run `work()` (registry and disk access) off the loop, then `finish(result)` on it;
        the outcome answers the request and goes to the audit log."""
        fields = {**fields, "token": _actor(protocol), "remote": _peer(protocol)}
        if self.draining:
            raise oip.ProtocolError("the server is draining", 503)
        loop = asyncio.get_running_loop()

        def done(future: asyncio.Future) -> None:
            try:
                answer = finish(future.result())
            except Exception as exc:  # noqa: BLE001 - every failure is answered and audited
                status = (exc.status if isinstance(exc, oip.ProtocolError) else 404 if isinstance(exc, LookupError)
                          else 403 if isinstance(exc, ProtectedAlias) else 400 if isinstance(exc, ValueError)
                          else 500)
                self.record(event, **fields, status=status, error=str(exc))
                if status == 500:
                    log.error("%s failed: %s", event, exc)
                protocol.respond(seq, http_response(status, error_body(str(exc))))
                return
            self.record(event, **{**fields, **answer, "status": 200})
            protocol.respond(seq, _ok(answer))

        loop.run_in_executor(None, work).add_done_callback(done)

    def _load(self, name: str, protocol, seq, runner, body) -> None:
        """Serve `name` from the registry (parameters.ref: NAME@ALIAS or NAME/VERSION;
        default NAME@latest). A model already served is switched without failing requests."""
        ref = self._parameters(body).get("ref", f"{name}@latest")
        if not isinstance(ref, str) or (ref.partition("@")[0] if "@" in ref else ref.partition("/")[0]) != name:
            raise oip.ProtocolError(f"parameters.ref must be {name}@ALIAS or {name}/VERSION, got {ref!r}")
        if "@" not in ref and not ref.partition("/")[2].isdigit():
            raise oip.ProtocolError(f"parameters.ref must be {name}@ALIAS or {name}/VERSION, got {ref!r}")
        # The loader resolves registry references only (never a path), and checks the name.
        if self.loader is None:
            raise oip.ProtocolError("this server was started without a registry to load models from", 400)

        def finish(new: ModelRunner) -> dict[str, Any]:
            if self.draining:  # the load finished after SIGTERM: serve nothing new
                new.close(drain=False)
                raise oip.ProtocolError("the server is draining", 503)
            if new.unavailable_reason:  # what serves the name now keeps serving it
                new.close(drain=False)
                raise oip.ProtocolError(f"model {new.name!r} version {new.version} {new.unavailable_reason}", 500)
            follower = (registry_follower(ref, new, self.home, self.loader)
                        if "@" in ref and self.home is not None else None)
            self.table.install(new, follower)
            return {"name": new.name, "version": new.version, "ref": ref}

        self._admin_task(protocol, seq, "admin.load", {"model": name, "ref": ref}, functools.partial(self.loader, ref),
                         finish)

    def _unload(self, name: str, protocol, seq, runner, body) -> None:
        if name not in self.table.models:
            raise oip.ProtocolError(f"unknown model {name!r}", 404)
        versions = self.table.remove(name)  # queued requests finish; new ones get 404
        self.record("admin.unload", model=name, versions=sorted(versions), token=_actor(protocol),
                    remote=_peer(protocol), status=200)
        protocol.respond(seq, _ok({"name": name, "unloaded": sorted(versions, key=version_key)}))

    def _move_alias(self, name: str, protocol, seq, runner, body) -> None:
        """Point NAME@ALIAS at a version in the registry; servers following it switch."""
        params = self._parameters(body)
        alias, version = params.get("alias"), params.get("version")
        if not isinstance(alias, str) or not isinstance(version, int) or isinstance(version, bool):
            raise oip.ProtocolError('parameters must name "alias" (string) and "version" (integer)')
        if self.home is None:
            raise oip.ProtocolError("this server was started without a registry", 400)
        actor = _actor(protocol) or "an unauthenticated client"

        def work() -> int | None:
            from vivace.registry.models import set_alias

            return set_alias(self.home, name, version, alias, reason=f"HTTP request by {actor}")

        self._admin_task(protocol, seq, "admin.alias", {"model": name, "alias": alias, "version": version}, work,
                         lambda previous: {"name": name, "alias": alias, "version": version, "previous": previous})

    def _rollout_action(self, name: str, protocol, seq, runner, body) -> None:
        """Start, step, promote or abort a rollout on NAME@ALIAS (registry/rollouts.py)."""
        params = self._parameters(body)
        action, alias = params.get("action"), params.get("alias")
        if action not in ("start", "step", "promote", "abort") or not isinstance(alias, str):
            raise oip.ProtocolError('parameters must name "action" (start, step, promote or abort) and "alias"')
        ref = f"{name}@{alias}"
        reason = f"HTTP request by {_actor(protocol) or 'an unauthenticated client'}: {params.get('reason', '')}"

        def work() -> dict[str, Any]:
            from vivace.registry import rollouts

            previous = None
            if action == "start":
                rollout = rollouts.start_rollout(
                    self.home, ref, canary=_int_param(params, "canary"), weight=_number_param(params, "weight", 10.0),
                    sticky=str(params.get("sticky", "")), shadow=_int_param(params, "shadow"),
                    shadow_sample=_number_param(params, "shadow_sample", 0.1), reason=reason,
                    policy=params.get("policy") if isinstance(params.get("policy"), dict) else None)
            elif action == "step":
                rollout = rollouts.step_rollout(self.home, ref, _number_param(params, "weight", None), reason)
            elif action == "promote":
                rollout, (_, previous) = None, rollouts.promote_rollout(self.home, ref, reason)
            else:
                rollout = rollouts.abort_rollout(self.home, ref, reason)
            return {"ref": ref, "action": action, "rollout": rollout.to_json() if rollout else None,
                    "previous": previous}

        self._admin_task(protocol, seq, "admin.rollout", {"model": name, "alias": alias, "action": action}, work,
                         lambda answer: answer)

    def _request_promotion(self, name: str, protocol, seq, runner, body) -> None:
        """Ask for a promotion to a protected alias; the token's name is the requester."""
        params = self._parameters(body)
        version, alias = _int_param(params, "version"), params.get("alias")
        if version is None or not isinstance(alias, str):
            raise oip.ProtocolError('parameters must name "version" (integer) and "alias"')
        requester = self._identity(protocol)

        def work() -> dict[str, Any]:
            from vivace.registry.approvals import request_promotion

            request = request_promotion(self.home, name, version, alias, str(params.get("reason", "")), requester)
            return {"request": request.id, "requester": requester}

        self._admin_task(protocol, seq, "admin.request", {"model": name, "alias": alias, "version": version},
                         work, lambda answer: answer)

    def _approve_promotion(self, name: str, protocol, seq, runner, body) -> None:
        """Approve or reject another token's promotion request (the approve scope)."""
        params = self._parameters(body)
        request_id, decision = _int_param(params, "request"), params.get("decision", "approve")
        if request_id is None or decision not in ("approve", "reject"):
            raise oip.ProtocolError('parameters must name "request" (integer); "decision": approve or reject')
        decider = self._identity(protocol)
        reason = str(params.get("reason", ""))

        def work() -> dict[str, Any]:
            from vivace.registry import approvals

            request = approvals.get_request(self.home, request_id)
            if request.name != name:
                raise oip.ProtocolError(f"promotion request {request_id} is for model {request.name!r}", 404)
            previous = None
            if decision == "approve":
                _, previous = approvals.approve_promotion(self.home, request_id, reason, approver=decider)
            else:
                approvals.reject_promotion(self.home, request_id, reason, decider=decider)
            return {"request": request_id, "decision": decision, "decider": decider, "previous": previous}

        self._admin_task(protocol, seq, "admin.approve", {"model": name, "request": request_id}, work,
                         lambda answer: answer)

    def _identity(self, protocol) -> str:
        """The token name that requests or approves a promotion: approvals need --auth."""
        actor = _actor(protocol)
        if actor is None:
            raise oip.ProtocolError("promotion requests and approvals over HTTP need --auth: the token names "
                                    "the requester and the approver", 403)
        return actor

    # -- lifecycle ----------------------------------------------------------------------
    def sweep(self) -> None:
        now = time.monotonic()
        for conn in list(self.connections):
            conn.sweep(now)
        self.table.watch(now)
        if self.frontend is not None:
            self.frontend.sync_routes()  # a hung model leaves the native path until it is back

    # -- automatic rollouts (registry/rollouts.py policy; engine/rollout.py judge) -------------
    def _counts(self, runner: ModelRunner, failures: dict[tuple[str, str, str], int]) -> Counts:
        stats = runner.stats()
        bounds, buckets, _ = stats["histograms"]["request_seconds"]
        failed = sum(n for (model, version, reason), n in failures.items()
                     if model == runner.name and version == runner.version and reason != "bad_request")
        return Counts(stats["success"], failed, tuple(bounds), tuple(buckets))

    def analyse_rollouts(self, now: float) -> None:
        # Splits exist only for names followed in the registry (self.home; None: the default).
        if not self.leader:
            return
        failures = None
        for split in list(self.table.splits.values()):
            if not split.policy or split.acting:
                continue
            failures = self.failures if failures is None else failures
            counts = {r.version: self._counts(r, failures) for r in split.runners()}
            if split.baseline is None:  # this step starts now
                split.baseline = counts
                continue
            stable = counts[split.stable.version].since(split.baseline[split.stable.version])
            canary = (counts[split.canary.version].since(split.baseline[split.canary.version])
                      if split.canary is not None else None)
            drifting = (split.canary.drift.status()["drifting"]
                        if split.canary is not None and split.canary.drift is not None else [])
            decision, evidence = judge(split, stable, canary, drifting, now - split.applied_at)
            split.verdict = {"decision": decision, **evidence}
            if decision != "wait":
                split.acting = True
                task = asyncio.get_running_loop().create_task(self._act(split, decision, evidence))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    async def _act(self, split: Split, decision: str, evidence: dict[str, Any]) -> None:
        """Write an automatic decision to the registry; the alias follower applies it."""
        from vivace.registry import rollouts
        from vivace.registry.models import PromotionRefused

        reason = "automatic analysis: " + ("; ".join(evidence["failed"]) if decision == "abort" else decision)
        loop = asyncio.get_running_loop()
        try:
            if decision == "step":
                await loop.run_in_executor(None, functools.partial(
                    rollouts.step_rollout, self.home, split.ref, evidence["next_weight"], reason, evidence))
            elif decision == "promote":
                try:
                    await loop.run_in_executor(None, functools.partial(
                        rollouts.promote_rollout, self.home, split.ref, reason, evidence=evidence))
                except ProtectedAlias:  # a second identity must approve: ask, and wait for it
                    request = await loop.run_in_executor(None, functools.partial(
                        _automatic_request, self.home, split.ref, int(split.canary.version)))
                    split.verdict = {**(split.verdict or {}), "decision": "awaiting approval",
                                     "request": request.id}
                    log.warning("%s: rollout passed every step; promotion request %d awaits approval",
                                split.ref, request.id)
                    return  # acting stays set: nothing more to judge until the alias moves
                except PromotionRefused as exc:  # the registry's gate has the last word
                    decision, reason = "abort", f"automatic analysis: the promotion gate refused: {exc}"
                    await loop.run_in_executor(None, functools.partial(
                        rollouts.abort_rollout, self.home, split.ref, reason, evidence))
            else:
                await loop.run_in_executor(None, functools.partial(
                    rollouts.abort_rollout, self.home, split.ref, reason, evidence))
            log.warning("%s: rollout %s (%s)", split.ref, decision, reason)
        except Exception as exc:  # e.g. the rollout was changed by hand meanwhile: judge again
            log.error("%s: cannot record the automatic rollout decision %s: %s", split.ref, decision, exc)
            split.acting = False

    def reload_tokens(self) -> None:
        """Pick up a changed token file (one stat when unchanged): revocations and new
        tokens apply within TOKEN_RELOAD_S."""
        try:
            generation = self.auth.generation
            self.auth.reload()
            self._token_error = None
            if self.frontend is not None and self.auth.generation != generation:
                self.frontend.sync_tokens()
        except (OSError, ValueError) as exc:  # keep the tokens we have
            if str(exc) != self._token_error:
                log.error("cannot reload the token file: %s", exc)
            self._token_error = str(exc)

    def begin_drain(self) -> None:
        self.draining = True
        for conn in list(self.connections):
            conn.close_when_idle()
        if self.frontend is not None:
            self.frontend.begin_drain()

    def in_flight(self) -> int:
        """What a drain waits for: requests queued or answered but unsent, and requests
        still arriving on a connection (the drain answers those; the timeouts bound them)."""
        native = self.frontend.in_flight() if self.frontend is not None else 0
        return native + sum(len(c.outstanding) + len(c.held) + (c.reading_since != 0.0 and not c.closed)
                            for c in self.connections)


def _int_param(params: dict[str, Any], key: str) -> int | None:
    value = params.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise oip.ProtocolError(f"parameters.{key} must be an integer")
    return value


def _number_param(params: dict[str, Any], key: str, default: Any) -> Any:
    value = params.get(key, default)
    if value is None or not isinstance(value, (int, float)) or isinstance(value, bool):
        raise oip.ProtocolError(f"parameters.{key} must be a number")
    return float(value)


def _automatic_request(home: str | None, ref: str, version: int) -> Any:
    """The promotion request of a rollout that passed every step on a protected alias (one
    per version: a restarted server finds the pending one)."""
    from vivace.registry.approvals import list_requests, request_promotion

    name, _, alias = ref.partition("@")
    pending = [r for r in list_requests(home) if (r.name, r.alias, r.version) == (name, alias, version)]
    return pending[0] if pending else request_promotion(
        home, name, version, alias, "automatic analysis: every step passed", "vivace serve (automatic analysis)")


def _merged(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, count in b.items():
        out[key] = out.get(key, 0) + count
    return out


def _actor(protocol: HttpProtocol) -> str | None:
    """The name of the token that authenticated the connection's current request."""
    return protocol.auth_cache[2].name if protocol.auth_cache else None


def _peer(protocol: HttpProtocol | NativeConnection) -> str | None:
    return protocol.peer


def triton_config(runner: ModelRunner) -> dict[str, Any]:
    """The model configuration as Triton returns it (what perf_analyzer reads)."""
    package = runner.package
    dynamic_batching = package.manifest()["dynamic_batching"]
    dynamic_batching["default_queue_policy"]["timeout_action"] = "REJECT"  # the only action Vivace has

    def tensor(spec):
        return {"name": spec.name, "data_type": datatypes.triton_name(spec.datatype), "dims": list(spec.row_shape)}

    parameters = {k: {"string_value": str(v)} for k, v in package.parameters.items()}
    if package.metadata.get("features"):  # Triton parameters are strings: the feature table as JSON
        parameters["features"] = {"string_value": oip.encode(package.metadata["features"]).decode()}

    return {
        "name": package.name,
        "platform": TRITON_PLATFORMS.get(package.platform, package.platform),
        "backend": TRITON_BACKENDS.get(package.platform, package.platform),
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": package.max_batch_size,
        "input": [tensor(s) for s in package.inputs],
        "output": [tensor(s) for s in package.outputs],
        "dynamic_batching": dynamic_batching,
        "instance_group": [{"name": package.name, "kind": package.instance_kind, "count": package.instance_count}],
        "parameters": parameters,
    }


def model_samples(families: Iterable[Any]) -> dict[tuple[str, str, str], float]:
    """{(sample name, model, version): value summed over the other labels} of metric families."""
    totals: dict[tuple[str, str, str], float] = {}
    for family in families:
        for sample in family.samples:
            model, version = sample.labels.get("model"), sample.labels.get("version")
            if model is not None and version is not None:
                key = (sample.name, model, version)
                totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def step_samples(families: Iterable[Any]) -> dict[tuple[str, str], dict[str, dict[str, float]]]:
    """{(model, version): {step: {sample name: value}}} of the ensemble steps' metrics."""
    steps: dict[tuple[str, str], dict[str, dict[str, float]]] = {}
    for family in families:
        for sample in family.samples:
            labels = sample.labels
            if "step" in labels and "model" in labels and "version" in labels:
                values = steps.setdefault((labels["model"], labels["version"]), {}).setdefault(labels["step"], {})
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return steps


def triton_stats(runner: ModelRunner, samples: dict[tuple[str, str, str], float],
                 steps: dict[tuple[str, str], dict[str, dict[str, float]]] | None = None) -> dict[str, Any]:
    """Triton's statistics of a model version, from the server's metrics (`model_samples`):
    with --workers these are merged across the worker processes. An ensemble's entry also
    lists its steps (`steps`, from `step_samples`), each with its own counts and time."""

    def value(name: str, scale: float = 1.0) -> int:
        return int(round(samples.get((name, runner.name, runner.version), 0.0) * scale))

    success, executions = value("vivace_request_success_total"), value("vivace_execution_count_total")
    return {
        "name": runner.name,
        "version": runner.version,
        "last_inference": 0,
        "inference_count": value("vivace_inference_count_total"),
        "execution_count": executions,
        "inference_stats": {
            "success": {"count": success, "ns": value("vivace_request_duration_seconds_sum", 1e9)},
            "fail": {"count": value("vivace_request_failure_total"), "ns": 0},
            "queue": {"count": success, "ns": value("vivace_queue_duration_seconds_sum", 1e9)},
            "compute_input": {"count": executions, "ns": value("vivace_compute_input_seconds_total", 1e9)},
            "compute_infer": {"count": executions, "ns": value("vivace_compute_infer_seconds_total", 1e9)},
            "compute_output": {"count": executions, "ns": value("vivace_compute_output_seconds_total", 1e9)},
        },
        "batch_stats": [],
        **({"steps": [{
            "name": step,
            "execution_count": int(values.get("vivace_step_execution_count_total", 0)),
            "inference_count": int(values.get("vivace_step_inference_count_total", 0)),
            "compute_infer": {"count": int(values.get("vivace_step_execution_count_total", 0)),
                              "ns": int(round(values.get("vivace_step_compute_seconds_total", 0.0) * 1e9))},
        } for step, values in steps[(runner.name, runner.version)].items()]}
           if steps and (runner.name, runner.version) in steps else {}),
    }


def tls_context(config: ServerConfig) -> ssl.SSLContext | None:
    """The server's TLS context (TLS 1.2 or later) when a certificate is configured."""
    if not config.tls_cert and not config.tls_key:
        return None
    if not (config.tls_cert and config.tls_key):
        raise ValueError("TLS needs both a certificate (--tls-cert) and its private key (--tls-key)")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load the TLS certificate {config.tls_cert} / key {config.tls_key}: {exc}") from None
    return context


async def serve(
    runners: list[ModelRunner],
    config: ServerConfig,
    ready: asyncio.Future | None = None,
    sock: socket.socket | None = None,
    followers: list[AliasFollower] = (),
    loader: Callable[[str], ModelRunner] | None = None,
    home: str | None = None,
    reuse_port: bool = False,
    leader: bool = True,
    quality: Any = None,
) -> int:
    """Serve until SIGTERM/SIGINT, then drain: answer accepted requests, refuse new ones.

    `reuse_port` (SO_REUSEPORT) lets the workers of `--workers` share the port.
    `quality`: a monitor.quality.QualityMonitor joining labels to the prediction log.

    `loader` builds a runner for a registry reference (repository load, alias moves);
    `home` is the registry the server may move aliases in.
    """
    loop = asyncio.get_running_loop()
    app = App(runners, config, loader=loader, home=home, leader=leader)
    if quality is not None:
        app.quality = quality
        quality.served = lambda: [r.quality_info() for r in app.runners()]
        quality.join.models = lambda name, version: (
            r.quality_info() if (r := app.table.models.get(name, {}).get(version)) is not None else None)
        quality.start()
    for runner in runners:
        runner.attach(loop)
    for follower in followers:
        await follower.catch_up(app.table)
    tls = tls_context(config)
    server: Acceptor | None = None  # the Python front end's
    if use_native(config):
        listener = sock if sock is not None else listening_socket(config, reuse_port)
        try:
            app.frontend = NativeFrontend(app, listener)  # holds its own copy of the socket
            port = listener.getsockname()[1]
        finally:
            listener.close()
        app.frontend.attach(loop)
        if app.tracing is not None:
            app.frontend.set_tracing(True, app.tracing.ratio)
        app.frontend.sync_tokens()
        app.frontend.sync_routes()
    else:
        listener = sock if sock is not None else listening_socket(config, reuse_port)
        server = Acceptor(loop, listener, lambda: HttpProtocol(app), tls)
        port = server.port
    stop = loop.create_future()

    def on_signal(signum: int) -> None:
        if not stop.done():
            log.info("signal %d: draining", signum)
            stop.set_result(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    tick = max(0.05, min(config.header_timeout, config.body_timeout, config.idle_timeout,
                         config.execution_timeout_s) / 4)

    async def sweeper() -> None:
        while True:
            await asyncio.sleep(tick)
            app.sweep()

    async def rollout_analyser() -> None:
        # Its own clock, not the sweep's (a quarter of the shortest timeout): a failing
        # canary is judged within ROLLOUT_ANALYSIS_S of its min_requests-th answer.
        while True:
            await asyncio.sleep(ROLLOUT_ANALYSIS_S)
            app.analyse_rollouts(time.monotonic())

    async def expirer() -> None:
        # Request deadlines are honoured even while every executor runs a long batch.
        while True:
            await asyncio.sleep(0.02)
            for runner in app.table.watched():
                if runner.execution == "threads":
                    runner.batcher.expire_due()

    async def trace_drainer() -> None:
        # The native front end's traced requests become spans in bulk, off the request path.
        while True:
            await asyncio.sleep(DRAIN_INTERVAL_S)
            try:
                app.tracing.drain_native(app.frontend)
            except Exception:  # the next drain retries; serving goes on
                log.exception("tracing: cannot take the native front end's spans")

    async def token_watcher() -> None:
        while True:
            await asyncio.sleep(TOKEN_RELOAD_S)
            app.reload_tokens()

    sweep_task = loop.create_task(sweeper())
    analyse_task = loop.create_task(rollout_analyser())
    expire_task = loop.create_task(expirer())
    token_task = loop.create_task(token_watcher()) if app.auth is not None else None
    trace_task = loop.create_task(trace_drainer()) if app.tracing is not None and app.frontend is not None else None
    for runner in app.runners():
        runner.tracing = app.tracing is not None
    for follower in followers:
        app.table.follow(follower)
    # Start-up allocated a large heap (torch); freezing it keeps full collections from
    # scanning it and pausing the loop for tens of milliseconds under load.
    gc.collect()
    gc.freeze()
    log.info("vivace serving %s on %s://%s:%d", ", ".join(f"{r.name}/{r.version}" for r in app.runners()),
             "https" if tls else "http", config.host, port)
    if ready is not None and not ready.done():
        ready.set_result(port)
    try:
        await stop
    finally:
        # Stop accepting: new connections are refused from here on.
        if server is not None:
            server.close()
        if app.frontend is not None:
            app.frontend.stop_accepting()
        app.table.stop_all_following()
        if quality is not None:
            quality.stop()
        app.begin_drain()
        deadline = time.monotonic() + config.drain_timeout
        while app.in_flight() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            app.begin_drain()
        for runner in app.runners():
            runner.close(drain=True)
        for conn in list(app.connections):
            conn.transport.close()
        if app.frontend is not None:
            if app.tracing is not None:
                app.tracing.drain_native(app.frontend)
            app.frontend.close()
        if trace_task is not None:
            trace_task.cancel()
        if app.tracing is not None:
            app.tracing.shutdown()
        sweep_task.cancel()
        analyse_task.cancel()
        expire_task.cancel()
        if token_task is not None:
            token_task.cancel()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        # Give the frozen heap back to the collector: extensions that check for leaks at
        # exit (triton's nanobind bindings, imported by torch's optimizers in `vivace demo`)
        # otherwise report every frozen object as leaked, hundreds of lines.
        gc.unfreeze()
    return 0
