"""`ServeOptions`: what `vivace serve` was asked to do, typed.

Built once from the command line (`from_args`), checked (`check`), and handed as JSON to
worker processes (`to_json` / `from_json`), so the server, the supervisor and the workers
read the same fields instead of an argparse namespace.
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import msgspec

from .config import ServerConfig


class OptionsError(ValueError):
    """Options that cannot be served together; the message names them."""


@dataclass
class ServeOptions:
    models: list[str]
    home: str
    server: ServerConfig = field(default_factory=ServerConfig)  # HTTP limits, front end, TLS, model control
    device: str | None = None
    threads: int | None = None
    execution: str | None = None          # "inline" | "threads" | None: per backend
    log_level: str = "INFO"
    log_format: str = "text"              # text | json (monitor/logs.py)
    workers: int = 1
    auth: bool = False                    # tokens from HOME/auth/tokens.json unless server.auth_tokens names a file
    drift_interval: float = 10.0
    drift_window: int = 10_000
    drift_webhook: str | None = None
    drift_command: str | None = None
    no_drift: bool = False
    prediction_log: str | None = None
    prediction_log_sample: float = 0.01
    prediction_log_max_mb: float = 64.0
    # Ground truth (monitor/quality.py; needs --prediction-log): labels joined to predictions.
    quality_window: int = 10_000          # labelled rows per version the metrics are computed over
    quality_min_labels: int = 100         # labels before thresholds are judged
    quality_threshold: list[str] = field(default_factory=list)  # "auc>=0.7", "logloss<=0.6", ...
    feedback_index: int = 100_000         # logged requests kept for the join (late labels)
    importance_interval: float = 60.0     # seconds between production importance runs; 0: off
    importance_rows: int = 1000           # rows sampled per run
    follow_interval: float = 1.0
    # A deployed release (engine/deploy.py): the one package directory is served under the
    # registry's name and version, and only if its package.json has this SHA-256.
    model_name: str | None = None
    model_version: str | None = None
    expect_sha256: str | None = None
    worker_index: int | None = None       # set in worker processes (engine/workers.py)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServeOptions:
        """The options of a parsed `vivace serve` (or `vivace demo`) command line: every
        flag has the name of the field it sets."""
        server = ServerConfig(**{f.name: getattr(args, f.name) for f in fields(ServerConfig)})
        own = {f.name: getattr(args, f.name) for f in fields(cls) if f.name not in ("server", "worker_index")}
        return cls(**own, server=server)

    def check(self) -> None:
        """Refuse combinations that cannot work, before anything starts."""
        if self.workers < 1:
            raise OptionsError(f"--workers must be at least 1, got {self.workers}")
        if self.workers > 1 and self.server.repository_control:
            raise OptionsError("--repository-control needs a single process: a load or unload would change one "
                               "worker only; move aliases in the registry (vivace models alias) instead")
        if self.model_name or self.model_version or self.expect_sha256:
            from .serving import is_registry_ref

            if len(self.models) != 1 or is_registry_ref(self.models[0]):
                raise OptionsError("--model-name, --model-version and --expect-sha256 apply to one package "
                                   "directory (a deployment's /mnt/models), not to NAME@ALIAS or several packages")
            if self.expect_sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", self.expect_sha256):
                raise OptionsError(f"--expect-sha256 must be 64 lowercase hex digits, got {self.expect_sha256!r}")
        if self.quality_threshold:
            from vivace.monitor.quality import parse_threshold

            try:
                for text in self.quality_threshold:
                    parse_threshold(text)
            except ValueError as exc:
                raise OptionsError(f"--quality-threshold: {exc}") from None
        if not 0.0 <= self.server.trace_sample_ratio <= 1.0:
            raise OptionsError(f"--trace-sample-ratio must be within [0, 1], got {self.server.trace_sample_ratio:g}")
        if self.server.trace_endpoint:
            try:
                import opentelemetry.exporter.otlp.proto.http.trace_exporter  # noqa: F401
                import opentelemetry.sdk.trace  # noqa: F401
            except ImportError:
                raise OptionsError("--trace-endpoint needs the OpenTelemetry SDK and OTLP exporter: "
                                   "pip install 'vivace[otel]'") from None
        if self.server.execution_timeout_s <= 0:
            raise OptionsError(f"--execution-timeout must be positive, got {self.server.execution_timeout_s:g}")
        from .frontend import use_native  # the one place that knows what each front end implements

        try:
            use_native(self.server_config())
        except ValueError as exc:
            raise OptionsError(str(exc)) from None

    def server_config(self) -> ServerConfig:
        """The server's configuration with the home's defaults filled in: the token file
        with --auth, and this process's own audit log."""
        from .auth import tokens_path

        tokens = self.server.auth_tokens or (str(tokens_path(self.home)) if self.auth else None)
        audit = self.own_file(self.server.audit_log or Path(self.home) / "audit" / "server.jsonl")
        return replace(self.server, auth_tokens=tokens, audit_log=str(audit))

    def own_file(self, path: str | Path) -> Path:
        """A log file of this process: with --workers, one per worker (rotation renames files,
        so a file must have a single writer)."""
        path = Path(path)
        if self.worker_index is None:
            return path
        return path.with_name(f"{path.stem}.worker{self.worker_index}{path.suffix}")

    def to_json(self) -> bytes:
        return msgspec.json.encode(self)

    @classmethod
    def from_json(cls, data: bytes) -> ServeOptions:
        return msgspec.json.decode(data, type=cls)
