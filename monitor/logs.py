"""The server's log lines: text for people, or JSON lines for log pipelines.

`configure_logging` is the one place the process's logging is set up (`vivace serve`, its
supervisor and its workers). JSON lines carry `ts` (ISO 8601, UTC), `level`, `logger`,
`message`, the process `role` (supervisor, worker N) when there is one, and `model`,
`version`, `request_id` and `trace_id` when the code logging the line names them
(`log.info(..., extra={"model": ...})`); an exception's traceback goes in `exc`.
"""
from __future__ import annotations

import datetime
import logging

import msgspec

LOG_FORMATS = ("text", "json")
# Record attributes a JSON line carries when the logging call set them (extra=...).
CONTEXT_FIELDS = ("model", "version", "request_id", "trace_id")

_encode = msgspec.json.Encoder().encode


class JsonLines(logging.Formatter):
    def __init__(self, role: str | None = None):
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(
                timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.role:
            line["role"] = self.role
        for key in CONTEXT_FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                line[key] = str(value)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return _encode(line).decode()


def configure_logging(level: str, log_format: str = "text", role: str | None = None) -> None:
    """Log to stderr at `level`, as text or JSON lines; `role` names the process (e.g.
    "worker 2"). The first call in a process wins (a worker's, before the server's)."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonLines(role))
    else:
        where = f" [{role}]" if role else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s %(name)s{where}: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level.upper())
