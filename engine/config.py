"""Server limits and timeouts: a dependency-free module, so the CLI can show defaults
without importing the HTTP stack."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 64 << 20
    max_header_bytes: int = 64 << 10
    max_headers: int = 100
    max_connections: int = 10_000
    header_timeout: float = 10.0  # first byte of a request → end of its headers
    body_timeout: float = 30.0    # end of headers → end of body
    idle_timeout: float = 75.0    # keep-alive connection with nothing in flight
    drain_timeout: float = 30.0   # SIGTERM: longest wait for accepted requests
    # Overload: refuse new infer requests (503 + Retry-After) while a model's oldest queued
    # request has waited longer than this; bounds admitted latency and memory. 0: off.
    shed_queue_wait_ms: float = 500.0
    # A batch running longer than this fails its requests (500 naming the model) and takes
    # the model out of service until the backend returns (executor threads only).
    execution_timeout_s: float = 60.0
    auth_tokens: str | None = None  # token file: bearer authentication on (engine/auth.py)
    audit_log: str | None = None    # JSON lines of authentication failures and admin actions
    tls_cert: str | None = None     # PEM certificate chain: serve HTTPS
    tls_key: str | None = None      # PEM private key of tls_cert
    # POST /v2/repository/models/{m}/load|unload|alias: off unless asked for (Triton's
    # explicit model control); with auth on they also need the admin scope.
    repository_control: bool = False
    # "native": the C++ front end (csrc/frontend/) answers plain JSON infer requests without
    # Python; "python": uvloop + httptools for everything; "auto": native unless TLS or
    # auth is on (only the Python front end implements them).
    http_frontend: str = "auto"
    # OpenTelemetry tracing (monitor/tracing.py): off without an endpoint. OTLP/HTTP
    # collector URL; share of requests without a traceparent that are traced; service.name.
    trace_endpoint: str | None = None
    trace_sample_ratio: float = 0.01
    trace_service_name: str = "vivace"
