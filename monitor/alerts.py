"""Drift alerts (and the actions every alert takes, `fire_alert`, shared with the quality
alerts of monitor/quality.py): periodic checks of a model version's sketches against its reference
profile, with hysteresis and a cool-down, and these actions on a new alert: a log line,
a webhook POST and retraining triggers — a configured command, and a
`model.retrain_trigger` record in the registry's audit log (`vivace audit NAME`) for a
version served from the registry, so a scheduler can pick it up.

State machine per feature: a feature enters "drift" when its statistics cross the
thresholds (and the window holds at least ``min_rows`` rows); it leaves "drift" only
when every statistic is below ``(1 - hysteresis)`` times its threshold, so a statistic
hovering at the threshold does not flap. An alert fires when a feature enters "drift";
alerts of one model version are at least ``cooldown_s`` apart (features entering drift
during the cool-down are reported with the next alert).
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .drift import DriftThresholds, FeatureDrift, json_number
from .sketch import ProfileSketch
from .tracing import inject, inject_env

log = logging.getLogger("vivace.monitor.alerts")


@dataclass(frozen=True)
class AlertConfig:
    """Where alerts go and how often. ``command`` runs without a shell; it receives
    VIVACE_MODEL, VIVACE_VERSION, VIVACE_DRIFT_FEATURES and VIVACE_ALERT (JSON) in its
    environment."""

    webhook_url: str | None = None
    webhook_timeout_s: float = 5.0
    command: Sequence[str] | None = None
    registry_home: str | None = None  # record each alert as a retraining trigger in this registry
    cooldown_s: float = 600.0
    hysteresis: float = 0.2
    min_rows: int = 1000


@dataclass
class Alert:
    model: str
    version: str
    features: list[str]
    stats: dict[str, dict[str, float | None]]
    time: float

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version, "features": self.features,
                "stats": self.stats, "time": self.time}


def _relaxed(t: DriftThresholds, hysteresis: float) -> DriftThresholds:
    """Thresholds a drifted feature must fall below to clear."""
    k = 1.0 - hysteresis

    def scale(v: float | None) -> float | None:
        return None if v is None else v * k

    return replace(t, psi=scale(t.psi), js=scale(t.js), wasserstein=scale(t.wasserstein), ks=scale(t.ks))


@dataclass
class DriftMonitor:
    """Checks one model version's sketches (inputs, and optionally predictions)."""

    model: str
    version: str
    sketches: Sequence[ProfileSketch]
    thresholds: DriftThresholds = field(default_factory=DriftThresholds)
    feature_thresholds: Mapping[str, Mapping[str, Any]] | None = None
    config: AlertConfig = field(default_factory=AlertConfig)
    clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        self.drifting: set[str] = set()
        self.pending: set[str] = set()  # entered drift, not yet alerted (cool-down)
        self.last_alert_at: float | None = None
        self.alerts: list[Alert] = []
        self.latest: list[FeatureDrift] = []
        self.latest_rows = 0
        self.processes: list[subprocess.Popen] = []
        self._lock = threading.Lock()
        self._periodic = Periodic(f"drift-{self.model}-{self.version}", self.check,
                                  f"drift check for {self.model}/{self.version}")

    def check(self) -> Alert | None:
        """Compute the statistics now, update states, fire an alert if one is due."""
        with self._lock:
            results: list[FeatureDrift] = []
            rows = 0
            for sketch in self.sketches:
                snap = sketch.snapshot()
                rows = max(rows, snap["rows"])
                results.extend(sketch.drift(self.thresholds, self.feature_thresholds, snap))
            self.latest, self.latest_rows = results, rows
            if rows < self.config.min_rows:
                return None
            for f in results:
                if f.name not in self.drifting and f.drifted:
                    self.drifting.add(f.name)
                    self.pending.add(f.name)
                elif f.name in self.drifting:
                    limits = _relaxed(self._limits(f.name), self.config.hysteresis)
                    if not limits.crossed(f.stats, f.kind):
                        self.drifting.discard(f.name)
                        self.pending.discard(f.name)
            now = self.clock()
            if not self.pending or (self.last_alert_at is not None
                                    and now - self.last_alert_at < self.config.cooldown_s):
                return None
            by_name = {f.name: f for f in results}
            alert = Alert(self.model, self.version, sorted(self.pending),
                          {n: {k: json_number(v) for k, v in by_name[n].stats.items()} for n in sorted(self.pending)},
                          now)
            self.pending.clear()
            self.last_alert_at = now
            self.alerts.append(alert)
        self._fire(alert)
        return alert

    def _limits(self, name: str) -> DriftThresholds:
        if self.feature_thresholds and name in self.feature_thresholds:
            return replace(self.thresholds, **self.feature_thresholds[name])
        return self.thresholds

    def status(self) -> dict[str, Any]:
        """The latest statistics, as served by GET /v2/models/{m}/drift.

        A feature's `drifted` says its statistics crossed a threshold in the latest check;
        `drifting` lists the features in the alert state, which needs `min_rows` rows in the
        window: `state` is "collecting" until then, and "drifting" or "stable" after."""
        with self._lock:
            if self.latest_rows < self.config.min_rows:
                state = "collecting"
            else:
                state = "drifting" if self.drifting else "stable"
            return {"model": self.model, "version": self.version, "rows": self.latest_rows,
                    "min_rows": self.config.min_rows, "state": state,
                    "window": self.sketches[0].window.describe() if self.sketches else None,
                    "drifting": sorted(self.drifting),
                    "features": [f.to_dict() for f in self.latest],
                    "last_alert_at": self.last_alert_at}

    def gauge_samples(self) -> list[tuple[str, str, float]]:
        """(feature, statistic, value) of the latest check for Prometheus gauges, e.g.
        ``vivace_drift_statistic{model, version, feature, statistic}``; each feature also
        has statistic "drifted" (1.0 while in the drift state, else 0.0). Non-finite and
        undefined statistics are left out."""
        with self._lock:
            out = []
            for f in self.latest:
                out.extend((f.name, k, float(v)) for k, v in f.stats.items() if json_number(v) is not None)
                out.append((f.name, "drifted", 1.0 if f.name in self.drifting else 0.0))
            return out

    def _fire(self, alert: Alert) -> None:
        fire_alert(self.config, alert.to_dict(), f"features {', '.join(alert.features)}",
                   {"VIVACE_DRIFT_FEATURES": ",".join(alert.features)}, self.processes,
                   reason=f"drift in {', '.join(alert.features)}")

    def start(self, interval_s: float) -> None:
        """Check every interval_s seconds on a daemon thread until stop()."""
        self._periodic.start(interval_s)

    def stop(self) -> None:
        self._periodic.stop()


class Periodic:
    """Runs `work` every interval on a daemon thread named `name` until stop(); a round
    that raises is logged as `what` and the next one runs (monitoring outlives one bad round)."""

    def __init__(self, name: str, work: Callable[[], Any], what: str):
        self.name = name
        self.work = work
        self.what = what
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, interval_s: float) -> None:
        if self._thread is not None:
            return

        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.work()
                except Exception:  # noqa: BLE001 - keep monitoring through one bad round
                    log.exception("%s failed", self.what)

        self._thread = threading.Thread(target=loop, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def fire_alert(config: AlertConfig, payload: dict[str, Any], summary: str, env: Mapping[str, str],
               processes: list[subprocess.Popen], reason: str | None = None) -> None:
    """The actions of a new alert (drift, or quality from monitor/quality.py): a log line, a
    webhook POST of `payload`, a `model.retrain_trigger` record in the registry, and the
    configured command (VIVACE_MODEL, VIVACE_VERSION, VIVACE_ALERT and `env` in its
    environment; started processes are appended to `processes`). `reason`: the trigger
    record's (default: `summary`)."""
    model, version = str(payload["model"]), str(payload["version"])
    log.warning("%s alert: model %s version %s, %s", payload.get("kind", "drift"), model, version, summary)
    if config.webhook_url:
        body = json.dumps(payload, allow_nan=False, default=str).encode()
        # The current trace context (W3C traceparent), when a span is current.
        headers = inject({"Content-Type": "application/json"})
        request = urllib.request.Request(config.webhook_url, data=body, method="POST", headers=dict(headers))
        try:
            with urllib.request.urlopen(request, timeout=config.webhook_timeout_s) as resp:
                resp.read()
        except (urllib.error.URLError, OSError) as exc:  # an unreachable hook must not stop monitoring
            log.error("%s webhook %s failed: %s", payload.get("kind", "drift"), config.webhook_url, exc)
    if config.registry_home:
        _record_trigger(config, model, version, reason or summary, payload)
    if config.command:
        full_env = dict(os.environ, VIVACE_MODEL=model, VIVACE_VERSION=version, **env,
                        VIVACE_ALERT=json.dumps(payload, allow_nan=False, default=str))
        inject_env(full_env)
        try:
            processes.append(subprocess.Popen(list(config.command), env=full_env, stdin=subprocess.DEVNULL))
            log.warning("retraining trigger started: %s", " ".join(config.command))
        except OSError as exc:
            log.error("retraining trigger %s failed to start: %s", config.command[0], exc)


def _record_trigger(config: AlertConfig, model: str, version: str, summary: str, payload: dict[str, Any]) -> None:
    from vivace.registry.store import open_home

    payload = json.loads(json.dumps(payload, allow_nan=False, default=str))
    if config.command:
        payload["command"] = list(config.command)
    try:
        home = open_home(config.registry_home)
        with home.transaction():
            home.audit("model.retrain_trigger", f"{model}/{version}", summary, payload)
    except Exception as exc:  # noqa: BLE001 - a busy or broken registry must not stop monitoring
        log.error("cannot record the retraining trigger in %s: %s", config.registry_home, exc)
