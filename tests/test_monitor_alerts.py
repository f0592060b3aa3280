"""Drift alerts (hysteresis, cool-down, webhook on loopback, retraining command) and the
prediction log (sampling, size cap, rotation)."""
from __future__ import annotations

import json
import logging
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import ClassVar

import numpy as np
import pytest
from vivace.monitor.alerts import AlertConfig, DriftMonitor
from vivace.monitor.drift import build_profile
from vivace.monitor.predlog import PredictionLogger
from vivace.monitor.sketch import Window, input_sketch


class _Hook(BaseHTTPRequestHandler):
    received: ClassVar[list] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def webhook():
    _Hook.received = []
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/hook", _Hook.received
    server.shutdown()
    server.server_close()


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture(scope="module")
def profile():
    rng = np.random.default_rng(0)
    return build_profile(rng.normal(size=(20000, 4)).astype(np.float32))


def _batch(shift: float, seed: int, rows: int = 5000) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(rows, 4)).astype(np.float32)
    x[:, 2] += shift
    return x


def test_alert_webhook_command_hysteresis_and_cooldown(tmp_path, profile, webhook, caplog):
    url, received = webhook
    marker = tmp_path / "retrain.txt"
    command = [sys.executable, "-c",
               "import os,sys; open(sys.argv[1],'a').write(os.environ['VIVACE_DRIFT_FEATURES']+'\\n')", str(marker)]
    sketch = input_sketch(profile, window=Window("rows", 5000, 1))  # the window is the latest 5000 rows
    clock = FakeClock()
    monitor = DriftMonitor("mlp", "3", [sketch], config=AlertConfig(webhook_url=url, command=command,
                                                                    cooldown_s=60, hysteresis=0.5, min_rows=1000),
                           clock=clock)
    sketch.update(_batch(0.0, 1))
    assert monitor.check() is None and monitor.status()["drifting"] == []

    sketch.update(_batch(0.6, 2))
    with caplog.at_level(logging.WARNING, logger="vivace.monitor.alerts"):
        alert = monitor.check()
    assert alert is not None and alert.features == ["f2"]
    assert "drift alert: model mlp version 3, features f2" in caplog.text
    assert received == [alert.to_dict()] and received[0]["stats"]["f2"]["ks"] > 0.1
    monitor.processes[-1].wait(timeout=30)
    assert marker.read_text() == "f2\n"

    # Still drifting: no new alert. Slightly below the threshold: stays drifting (hysteresis).
    clock.now += 120
    sketch.update(_batch(0.6, 3))
    assert monitor.check() is None
    sketch.update(_batch(0.07, 4))
    assert monitor.check() is None and monitor.status()["drifting"] == ["f2"]
    # Back to normal: clears; drifting again within the cool-down: no alert until it ends.
    sketch.update(_batch(0.0, 5))
    monitor.check()
    assert monitor.status()["drifting"] == []
    sketch.update(_batch(0.6, 6))
    clock.now += 10
    monitor.last_alert_at = clock.now - 10
    assert monitor.check() is None and monitor.status()["drifting"] == ["f2"]
    clock.now += 60
    assert monitor.check().features == ["f2"]
    assert len(received) == 2
    status = monitor.status()
    json.dumps(status)  # what GET /v2/models/{m}/drift serves is plain JSON
    assert status["rows"] == 5000 and len(status["features"]) == 4
    samples = {(f, k): v for f, k, v in monitor.gauge_samples()}
    assert samples[("f2", "drifted")] == 1.0 and samples[("f0", "drifted")] == 0.0
    assert samples[("f2", "ks")] > 0.1 and ("f2", "ks_pvalue") in samples


def test_alerts_are_recorded_as_retraining_triggers_in_the_registry(tmp_path, profile, caplog):
    from vivace.registry.store import open_home

    sketch = input_sketch(profile, window=Window("rows", 5000, 1))
    monitor = DriftMonitor("churn", "2", [sketch], config=AlertConfig(registry_home=str(tmp_path / "home"),
                                                                      command=["true"], min_rows=10))
    sketch.update(_batch(1.0, 1))
    alert = monitor.check()
    records = [r for r in open_home(tmp_path / "home").audit_log(target="churn")
               if r["action"] == "model.retrain_trigger"]
    assert len(records) == 1 and records[0]["target"] == "churn/2" and records[0]["reason"] == "drift in f2"
    assert records[0]["details"]["features"] == alert.features and records[0]["details"]["command"] == ["true"]
    monitor.processes[-1].wait(timeout=30)
    # An unusable registry is logged; monitoring goes on.
    (tmp_path / "file").write_text("")
    broken = DriftMonitor("m", "1", [sketch], config=AlertConfig(registry_home=str(tmp_path / "file"), min_rows=10))
    with caplog.at_level(logging.ERROR, logger="vivace.monitor.alerts"):
        assert broken.check() is not None
    assert "cannot record the retraining trigger" in caplog.text


def test_unreachable_webhook_and_missing_command_do_not_stop_monitoring(profile, caplog):
    sketch = input_sketch(profile, window=Window("rows", 5000, 1))
    monitor = DriftMonitor("m", "1", [sketch], config=AlertConfig(
        webhook_url="http://127.0.0.1:9/none", webhook_timeout_s=1, command=["/nonexistent/retrain"], min_rows=10))
    sketch.update(_batch(1.0, 1))
    with caplog.at_level(logging.ERROR, logger="vivace.monitor.alerts"):
        assert monitor.check() is not None
    assert "drift webhook" in caplog.text and "failed to start" in caplog.text


def test_min_rows_and_background_thread(profile):
    sketch = input_sketch(profile)
    monitor = DriftMonitor("m", "1", [sketch], config=AlertConfig(min_rows=10_000))
    sketch.update(_batch(2.0, 1, rows=500))
    assert monitor.check() is None and monitor.alerts == []  # too few rows to judge
    monitor.start(0.01)
    sketch.update(_batch(2.0, 2, rows=10_000))
    for _ in range(500):
        if monitor.alerts:
            break
        threading.Event().wait(0.01)
    monitor.stop()
    assert monitor.alerts and monitor.alerts[0].features == ["f2"]


def test_prediction_log_samples_rotates_and_caps(tmp_path):
    path = tmp_path / "log" / "predictions.jsonl"
    with PredictionLogger(path, sample_rate=0.5, max_bytes=4096, backups=2) as plog:
        logged = [plog.log(f"req-{i}", "mlp", "3", 0.001, np.arange(4, dtype=np.float32), [0.5]) for i in range(400)]
    assert 120 < sum(logged) < 280  # about half, decided by the request id
    with PredictionLogger(tmp_path / "again.jsonl", sample_rate=0.5) as again:
        assert [again.sampled(f"req-{i}") for i in range(400)] == logged  # same decision everywhere
    files = sorted(p.name for p in path.parent.iterdir())
    assert files == ["predictions.jsonl", "predictions.jsonl.1", "predictions.jsonl.2"]
    total = 0
    for name in files:
        lines = (path.parent / name).read_text().splitlines()
        total += len(lines)
        assert (path.parent / name).stat().st_size <= 4096
        for line in lines:
            rec = json.loads(line)
            assert rec["model"] == "mlp" and rec["inputs"] == [0.0, 1.0, 2.0, 3.0] and rec["request_id"].startswith("req-")
    assert total < sum(logged)  # the oldest rotated file was dropped
    last = json.loads(path.read_text().splitlines()[-1])
    assert last["request_id"] == f"req-{max(i for i, ok in enumerate(logged) if ok)}"


def test_prediction_log_refuses_bad_settings_and_records(tmp_path):
    with pytest.raises(ValueError, match="sample_rate"):
        PredictionLogger(tmp_path / "p.jsonl", sample_rate=1.5)
    with pytest.raises(ValueError, match="max_bytes"):
        PredictionLogger(tmp_path / "p.jsonl", max_bytes=10)
    plog = PredictionLogger(tmp_path / "p.jsonl", max_bytes=1024)
    with pytest.raises(ValueError, match="exceeds max_bytes"):
        plog.log("r", "m", "1", 0.0, list(range(1000)), [])
    with pytest.raises(TypeError):
        plog.log("r", "m", "1", 0.0, object(), [])
    plog.close()
    assert (tmp_path / "p.jsonl").read_text() == ""  # nothing half-written
    with pytest.raises(ValueError, match="closed"):
        plog.log("r", "m", "1", 0.0, [1], [])


def test_status_says_alerts_wait_for_min_rows(profile):
    """Under min_rows a shifted feature crosses its thresholds (`drifted`) but enters no
    alert state (`drifting`); the status says why (issue 13 item 9)."""
    sketch = input_sketch(profile, window=Window("rows", 5000, 2))
    monitor = DriftMonitor("mlp", "3", [sketch], config=AlertConfig(min_rows=1000))
    sketch.update(_batch(0.6, 0, rows=500))
    assert monitor.check() is None
    status = monitor.status()
    assert status["drifting"] == [] and status["state"] == "collecting" and status["min_rows"] == 1000
    assert next(f for f in status["features"] if f["name"] == "f2")["drifted"]
    sketch.update(_batch(0.6, 1, rows=1000))
    assert monitor.check() is not None
    status = monitor.status()
    assert status["state"] == "drifting" and status["drifting"] == ["f2"]


def test_status_is_stable_with_enough_unchanged_rows(profile):
    sketch = input_sketch(profile, window=Window("rows", 5000, 2))
    monitor = DriftMonitor("mlp", "3", [sketch], config=AlertConfig(min_rows=1000))
    sketch.update(_batch(0.0, 3, rows=2000))
    assert monitor.check() is None
    assert monitor.status()["state"] == "stable" and monitor.status()["drifting"] == []
