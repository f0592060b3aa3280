"""Structured logs: `vivace serve --log-format json` writes one JSON object per line (the
supervisor's and each worker's lines name their role); text stays the default."""
from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from conftest import ServerProcess, free_port, wait_for

from vivace.monitor.logs import JsonLines, configure_logging


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_serve_writes_json_lines_until_it_drains(mlp_package):
    server = ServerProcess([mlp_package], "--log-format", "json", "--log-level", "INFO")
    assert server.stop() == 0
    lines = json_lines(server.proc.stderr.read().decode())
    assert lines, "no log lines"
    assert all({"ts", "level", "logger", "message"} <= set(line) for line in lines)
    assert all(line["ts"].endswith("+00:00") for line in lines)
    messages = [line["message"] for line in lines]
    assert any(m.startswith("vivace serving mlp/1") for m in messages) and "signal 15: draining" in messages


def test_json_lines_carry_the_context_and_exceptions():
    formatter = JsonLines(role="worker 2")
    record = logging.LogRecord("vivace.server", logging.ERROR, __file__, 1, "model %s failed", ("m",), None)
    record.model, record.version = "m", "3"
    line = json.loads(formatter.format(record))
    assert line["message"] == "model m failed" and line["role"] == "worker 2"
    assert (line["model"], line["version"], line["level"], line["logger"]) == ("m", "3", "ERROR", "vivace.server")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record.exc_info = sys.exc_info()
    assert "RuntimeError: boom" in json.loads(formatter.format(record))["exc"]


def test_workers_log_json_lines_naming_their_role(mlp_package):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "vivace", "serve", str(mlp_package), "--port", str(port),
                             "--workers", "2", "--log-format", "json"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        import urllib.request

        def both_serving():  # /metrics merges every worker's process metrics, labelled
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as response:
                    text = response.read().decode()
            except OSError:
                assert proc.poll() is None, "the supervisor exited"
                return False
            return 'worker="0"' in text and 'worker="1"' in text

        wait_for(both_serving, timeout=120, what="both workers")
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    roles = {line.get("role") for line in json_lines(err)}
    assert {"supervisor", "worker 0", "worker 1"} <= roles, roles


def test_a_bad_log_format_is_refused():
    with pytest.raises(ValueError, match="log format must be one of text, json"):
        configure_logging("INFO", "yaml")
    done = subprocess.run([sys.executable, "-m", "vivace", "serve", "x", "--log-format", "yaml"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "invalid choice: 'yaml'" in done.stderr
