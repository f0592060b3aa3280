"""Experiment tracking: one record per training run (params, metrics, environment, status)."""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

from .store import Home, NotFoundError, open_home

TRACKED_PACKAGES = ("vivace", "torch", "numpy", "pandas", "pyarrow", "pyyaml")


@dataclass
class Run:
    id: str
    name: str
    status: str
    config: dict[str, Any]
    params: dict[str, Any]
    metrics: dict[str, float]
    epochs: list[dict[str, float]]
    behavioural: list[dict[str, Any]]
    environment: dict[str, Any]
    datasets: list[str]
    feature_views: list[str]
    package_sha: str | None
    weights_hash: str | None
    error: str | None
    started_at: float
    ended_at: float | None
    duration_s: float | None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _row_to_run(row: Any) -> Run:
    return Run(
        id=row["id"], name=row["name"], status=row["status"], config=json.loads(row["config"]),
        params=json.loads(row["params"]), metrics=json.loads(row["metrics"]), epochs=json.loads(row["epochs"]),
        behavioural=json.loads(row["behavioural"]), environment=json.loads(row["environment"]),
        datasets=json.loads(row["datasets"]), feature_views=json.loads(row["feature_views"]),
        package_sha=row["package_sha"], weights_hash=row["weights_hash"],
        error=row["error"], started_at=row["started_at"], ended_at=row["ended_at"], duration_s=row["duration_s"],
    )


def environment_info() -> dict[str, Any]:
    """Python, platform, versions of the packages that shape a result, and the git commit."""
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    info: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(), "packages": versions}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5)
            info["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass  # no git, or not a working tree: the run simply has no commit
    return info


def start_run(home: Home, name: str, config: dict[str, Any], params: dict[str, Any]) -> str:
    run_id = uuid.uuid4().hex[:12]
    with home.transaction() as db:
        db.execute(
            "INSERT INTO runs (id, name, status, config, params, metrics, epochs, behavioural, environment,"
            " datasets, started_at) VALUES (?, ?, 'running', ?, ?, '{}', '[]', '[]', ?, '[]', ?)",
            (run_id, name, json.dumps(config), json.dumps(params), json.dumps(environment_info()), time.time()),
        )
    return run_id


def finish_run(home: Home, run_id: str, status: str, **fields: Any) -> None:
    """Close a run as 'finished' or 'failed', storing the given result fields."""
    json_fields = {"params", "metrics", "epochs", "behavioural", "datasets", "feature_views"}
    now = time.time()
    with home.transaction() as db:
        started = db.execute("SELECT started_at FROM runs WHERE id = ?", (run_id,)).fetchone()[0]
        assignments = {"status": status, "ended_at": now, "duration_s": now - started}
        assignments.update({k: json.dumps(v) if k in json_fields else v for k, v in fields.items()})
        db.execute(
            f"UPDATE runs SET {', '.join(f'{k} = ?' for k in assignments)} WHERE id = ?",
            (*assignments.values(), run_id),
        )


def get_run(home: Home | str | os.PathLike | None, run_id: str) -> Run:
    """A run by id (a unique prefix is enough); NotFoundError otherwise."""
    home = open_home(home)
    rows = home.db.execute("SELECT * FROM runs WHERE id LIKE ? LIMIT 2", (run_id + "%",)).fetchall()
    if not rows or not run_id:
        raise NotFoundError(f"unknown run {run_id!r}")
    if len(rows) > 1:
        raise NotFoundError(f"run id prefix {run_id!r} is ambiguous")
    return _row_to_run(rows[0])


def list_runs(home: Home | str | os.PathLike | None, name: str | None = None) -> list[Run]:
    home = open_home(home)
    sql = "SELECT * FROM runs" + (" WHERE name = ?" if name else "") + " ORDER BY started_at"
    return [_row_to_run(r) for r in home.db.execute(sql, (name,) if name else ())]


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = json.dumps(value) if isinstance(value, (list, bool)) or value is None else str(value)


def compare_runs(home: Home | str | os.PathLike | None, run_ids: list[str]) -> str:
    """A side-by-side text table of params, metrics and outcome; differing params marked '*'."""
    runs = [get_run(home, r) for r in run_ids]
    columns: list[dict[str, str]] = []
    for run in runs:
        col: dict[str, str] = {"status": run.status, "dataset": ",".join(run.datasets),
                               "duration_s": f"{run.duration_s:.2f}" if run.duration_s else "-"}
        _flatten("param", run.params, col)
        for k, v in run.metrics.items():
            col[f"metric.{k}"] = f"{v:.6g}"
        passed = sum(1 for t in run.behavioural if t.get("passed"))
        col["behavioural"] = f"{passed}/{len(run.behavioural)} passed"
        col["weights_sha256"] = (run.weights_hash or "-")[:12]
        columns.append(col)
    keys: list[str] = []
    for col in columns:
        keys += [k for k in col if k not in keys]
    keys.sort(key=lambda k: (not k.startswith("metric."), k.startswith("param."), k))
    rows = [["", *[r.id for r in runs]]]
    for key in keys:
        values = [col.get(key, "-") for col in columns]
        marker = "*" if len(set(values)) > 1 and key.startswith("param.") else ""
        rows.append([marker + key, *values])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)
