"""HTTP/1.1 front end: uvloop transport, httptools (llhttp) parsing, KServe v2 routes.

One `HttpProtocol` per connection. Requests on a connection may be pipelined; each gets a
sequence number and responses are written strictly in that order, whatever order the
batcher finishes them in. Infer requests go to the model's C++ batcher and are answered
from the loop when the batch completes; everything else is answered inline.

Limits (ServerConfig) protect the process: body and header sizes, header count, open
connections, and timeouts for slow headers, slow bodies and idle keep-alive connections,
enforced by one periodic sweep rather than a timer per request.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httptools

from . import oip
from .infer import Outcome
from .routes import OPEN_PATHS

if TYPE_CHECKING:
    from .server import App


REASONS = {
    100: b"Continue", 200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden",
    404: b"Not Found", 405: b"Method Not Allowed", 408: b"Request Timeout", 413: b"Payload Too Large",
    431: b"Request Header Fields Too Large", 500: b"Internal Server Error",
    503: b"Service Unavailable",
}
JSON = b"application/json"
LINGER_SECONDS = 2.0


RETRY_AFTER = b"retry-after: 1\r\n"
# Connections accepted per readiness of the listening socket: all that are pending, in
# practice; the bound keeps one wake-up from holding the loop through a connection storm.
ACCEPT_BATCH = 1024
ACCEPT_RETRY_S = 0.1  # out of descriptors: wait this long before accepting again

log = logging.getLogger("vivace.http")


class Acceptor:
    """Accepts the connections of a listening socket for the loop.

    asyncio's create_server under uvloop accepts one connection per loop iteration; while the
    loop is busy (parsing, refusing, running inline batches) a burst of new connections then
    waits in the kernel's accept queue for seconds, unanswered. This accepts every pending
    connection at each wake-up and hands each to `protocol_factory` as create_server would.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 protocol_factory: Callable[[], asyncio.Protocol], tls: ssl.SSLContext | None = None):
        self.loop = loop
        self.sock = sock
        self.protocol_factory = protocol_factory
        self.tls = tls
        self.port = sock.getsockname()[1]
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: the queue waits, the loop does not spin
                log.warning("accepting a connection failed: %s", exc)
                self.loop.remove_reader(self.sock.fileno())
                self.loop.call_later(ACCEPT_RETRY_S, self._resume)
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = self.loop.create_task(self.loop.connect_accepted_socket(self.protocol_factory, conn, ssl=self.tls))
            task.add_done_callback(_handshake_done)

    def _resume(self) -> None:
        if self.sock.fileno() >= 0:
            self.loop.add_reader(self.sock.fileno(), self._accept)

    def close(self) -> None:
        """Stop accepting: the listening socket closes, new connections are refused."""
        if self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()


def _handshake_done(task: asyncio.Task) -> None:
    # A client that fails its TLS handshake (or resets at once) is its own problem, not the server's.
    if not task.cancelled() and task.exception() is not None:
        log.debug("connection setup failed: %s", task.exception())


def http_response(status: int, body: bytes, content_type: bytes = JSON, extra: bytes = b"", close: bool = False) -> bytes:
    if status == 503 and b"retry-after:" not in extra.lower():  # every 503 tells the client when to retry
        extra += RETRY_AFTER
    return b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n%s%s\r\n%s" % (
        status,
        REASONS.get(status, b"Unknown"),
        content_type,
        len(body),
        extra,
        b"connection: close\r\n" if close else b"",
        body,
    )


def error_body(message: str) -> bytes:
    return oip.encode({"error": message})


def origin_form(target: bytes) -> bytes:
    """absolute-form "http://host:port/path?q" → "/path?q" (RFC 9112 3.2.2: servers must accept
    it); b"" when it names no host or no path. The native front end does the same
    (csrc/frontend/http_parse.cpp OriginForm)."""
    lower = target[:8].lower()
    skip = 7 if lower.startswith(b"http://") else 8 if lower.startswith(b"https://") else 0
    if not skip:
        return target
    end = len(target)
    path = next((i for i in range(skip, end) if target[i] in b"/?#"), end)
    if path == skip:
        return b""
    if path == end:
        return b"/"
    return target[path:] if target[path] == 0x2F else b""


def http_answer(outcome: Outcome) -> bytes:
    """An infer call's outcome as an HTTP response (both front ends send these)."""
    status, body, header_length = outcome
    if status != 200:
        return http_response(status, body)
    if header_length is None:
        return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
            len(body), body)
    return http_response(200, body, b"application/octet-stream",
                         b"inference-header-content-length: %d\r\n" % header_length)


class HttpProtocol(asyncio.Protocol):
    __slots__ = (
        "app", "config", "transport", "parser", "url", "headers_size", "header_count",
        "header_length", "expect_continue", "body", "body_size", "keep_alive", "reading_since",
        "headers_done_at", "last_active", "next_seq", "next_write", "held", "close_after",
        "outstanding", "closed", "rejected", "authorization", "auth_cache", "traceparent", "tracestate",
        "received",
    )

    def __init__(self, app: "App"):
        self.app = app
        self.config = app.config
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body: list[bytes] = []
        self.body_size = 0
        self.headers_size = 0
        self.header_count = 0
        self.header_length: bytes | None = None
        self.expect_continue = False
        self.keep_alive = True
        self.reading_since = 0.0  # 0: no request being read
        self.headers_done_at = 0.0
        self.last_active = time.monotonic()
        self.next_seq = 0     # sequence number of the next request read
        self.next_write = 0   # sequence number of the next response to write
        self.held: dict[int, bytes] = {}  # responses finished out of order
        self.close_after = -1  # sequence number after whose response we close
        self.outstanding: dict[int, Any] = {}  # token → runner, for cancellation
        self.closed = False
        self.rejected = False  # a request is being refused: ignore the rest of the stream
        self.authorization: bytes | None = None
        # (Authorization header, token-file generation, principal) of the last authenticated
        # request: keep-alive clients resend the same token, which is then hashed only once.
        self.auth_cache: tuple | None = None
        # W3C trace context of the current request, and when its first byte came (monotonic s)
        self.traceparent: bytes | None = None
        self.tracestate: bytes | None = None
        self.received = 0.0

    # -- transport callbacks ------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        app = self.app
        if len(app.connections) >= self.config.max_connections or app.draining:
            reason = "server is draining" if app.draining else "too many connections"
            transport.write(http_response(503, error_body(reason), close=True))
            transport.close()
            self.closed = True
            return
        app.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.app.connections.discard(self)
        for token, runner in self.outstanding.items():
            runner.cancel(token)
        self.outstanding.clear()

    def data_received(self, data: bytes) -> None:
        if self.rejected or self.closed:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.reject(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            if not self.rejected:
                self.reject(400, f"malformed HTTP request: {exc}")

    @property
    def peer(self) -> str | None:
        """host:port of the client, for the audit log."""
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else None

    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()

    # -- parser callbacks ---------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []
        self.body_size = 0
        self.headers_size = 0
        self.header_count = 0
        self.header_length = None
        self.authorization = None
        self.traceparent = None
        self.tracestate = None
        self.expect_continue = False
        self.reading_since = time.monotonic()
        self.headers_done_at = 0.0

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.headers_size += len(url)
        if self.headers_size > self.config.max_header_bytes:
            self.reject(431, "request line and headers exceed the size limit")
            raise httptools.HttpParserError("header limit")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_count += 1
        self.headers_size += len(name) + len(value)
        if self.header_count > self.config.max_headers or self.headers_size > self.config.max_header_bytes:
            self.reject(431, "too many or too large request headers")
            raise httptools.HttpParserError("header limit")
        size = len(name)  # only six header names matter: skip lower() for the others
        if size != 31 and size != 14 and size != 13 and size != 6 and size != 11 and size != 10:
            return
        lname = name.lower()
        if lname == b"authorization":
            self.authorization = value
        elif lname == b"traceparent":
            self.traceparent = value
        elif lname == b"tracestate":
            self.tracestate = value
        elif lname == b"inference-header-content-length":
            self.header_length = value
        elif lname == b"expect":
            self.expect_continue = value.lower() == b"100-continue"
        elif lname == b"content-length":
            try:
                too_big = int(value) > self.config.max_body_bytes
            except ValueError:
                too_big = False  # llhttp rejects a malformed length itself
            if too_big:
                self.reject(413, f"request body exceeds the limit of {self.config.max_body_bytes} bytes")
                raise httptools.HttpParserError("body limit")

    def on_headers_complete(self) -> None:
        if self.url[:1] != b"/" and self.url != b"*":
            self.url = origin_form(self.url)
            if not self.url:
                self.reject(400, "malformed HTTP request: invalid request target")
                raise httptools.HttpParserError("request target")
        self.keep_alive = self.parser.should_keep_alive()
        self.headers_done_at = time.monotonic()
        if self.expect_continue:
            auth = self.app.auth
            open_path = self.url.split(b"?", 1)[0] in OPEN_PATHS
            refused = auth.authenticate(self.authorization) if auth is not None and not open_path else None
            if isinstance(refused, str):  # refuse before the client sends the body it announced
                self.reject(401, refused, b'www-authenticate: Bearer realm="vivace"\r\n')
                raise httptools.HttpParserError("unauthenticated")
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self.body_size += len(body)
        if self.body_size > self.config.max_body_bytes:
            self.reject(413, f"request body exceeds the limit of {self.config.max_body_bytes} bytes")
            raise httptools.HttpParserError("body limit")
        self.body.append(body)

    def on_message_complete(self) -> None:
        seq = self.next_seq
        self.next_seq += 1
        self.received = self.reading_since
        self.reading_since = 0.0
        if not self.keep_alive:
            self.close_after = seq
            self.rejected = True  # nothing after a Connection: close request is read
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        self.body = []
        try:
            method = self.parser.get_method()
        except httptools.HttpParserError:
            method = b""
        self.app.dispatch(self, seq, method, self.url, body)

    # -- responses ----------------------------------------------------------------------
    def answer(self, seq: int, outcome: Outcome) -> None:
        """The answer to infer request `seq` (engine/infer.py Sink)."""
        self.respond(seq, http_answer(outcome))

    def respond(self, seq: int, data: bytes) -> None:
        """Send the response for request `seq`, keeping pipelined responses in order."""
        if self.closed:
            return
        if seq != self.next_write:
            self.held[seq] = data
            return
        transport = self.transport
        transport.write(data)
        seq += 1
        held = self.held
        while held and seq in held:
            transport.write(held.pop(seq))
            seq += 1
        self.next_write = seq
        self.last_active = time.monotonic()
        if 0 <= self.close_after < seq:
            self.closed = True
            if self.rejected and transport.can_write_eof():
                # Lingering close: the client may still be sending what we refused to
                # read; closing now would reset the connection and could destroy the
                # error response before the client reads it. Half-close, keep
                # discarding input for a moment, then close.
                transport.write_eof()
                asyncio.get_running_loop().call_later(LINGER_SECONDS, transport.close)
            else:
                transport.close()

    def reject(self, status: int, message: str, extra: bytes = b"") -> None:
        """Answer a request we stop reading (bad framing, limits, auth) and close after it."""
        if self.rejected and self.close_after >= 0:
            return
        seq = self.next_seq
        self.next_seq += 1
        self.rejected = True
        self.close_after = seq
        self.app.count_http_error(status)
        self.respond(seq, http_response(status, error_body(message), extra=extra, close=True))

    def sweep(self, now: float) -> None:
        """Close slow or idle connections (called periodically by the app)."""
        if self.closed:
            return
        config = self.config
        if self.reading_since:
            if self.headers_done_at == 0.0 and now - self.reading_since > config.header_timeout:
                self.reject(408, "timed out waiting for request headers")
            elif self.headers_done_at and now - self.headers_done_at > config.body_timeout:
                self.reject(408, "timed out waiting for the request body")
        # The first request must arrive within the header timeout.
        elif not self.outstanding and not self.held and now - self.last_active > (
                config.idle_timeout if self.next_seq else config.header_timeout):
            self.closed = True
            self.transport.close()

    def close_when_idle(self) -> None:
        """Drain: finish what was accepted on this connection, then close it."""
        if self.closed:
            return
        if self.next_write == self.next_seq and not self.reading_since:
            self.closed = True
            self.transport.close()
        else:
            self.close_after = self.next_seq - 1 if not self.reading_since else self.next_seq
            self.keep_alive = False

