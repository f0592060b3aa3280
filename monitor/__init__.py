"""vivace.monitor: Prometheus metrics, drift profiles and statistics, reports, sketches, alerts.

The drift API is importable from here (loaded on first use, so importing
``vivace.monitor.metrics`` stays light):

    from vivace.monitor import drift_report, build_profile
    report = drift_report(reference, current)       # DriftReport
    report.to_html(); report.to_json()
"""
from __future__ import annotations

from typing import Any

_DRIFT_EXPORTS = ("DriftInputError", "DriftReport", "DriftThresholds", "FeatureDrift", "build_profile",
                  "drift_report", "load_profile", "load_table")

__all__ = list(_DRIFT_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _DRIFT_EXPORTS:
        from . import drift

        return getattr(drift, name)
    raise AttributeError(f"module 'vivace.monitor' has no attribute {name!r}")
