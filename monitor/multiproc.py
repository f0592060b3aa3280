"""Metrics of a server that runs as several worker processes.

Each worker publishes a snapshot of its own metric families to ``<run dir>/worker-<i>.msgpack``
(msgspec, written to a temporary name and renamed, so readers never see half a file): about
once a second and whenever it answers ``/metrics``. The worker that answers a scrape merges
its live families with the other workers' snapshots, so any worker shows the whole server:

- counters and histograms (every bucket, ``_sum``, ``_count``) are summed per label set;
- gauges are summed (queue depth), except ``vivace_model_ready`` (minimum: ready only when
  every worker is) and ``vivace_drift_statistic`` (maximum: each worker sketches its own
  share of the traffic, and an alert should fire if any share drifted);
- series that carry a ``worker`` label (process CPU, memory, file descriptors) stay per
  worker, and ``vivace_worker_request_success_total{worker}`` shows how connections were
  spread across workers.

When a worker dies, the supervisor folds the counters and histograms of its last snapshot
into ``retired.msgpack`` before restarting it, so server totals never go backwards; only
what the dead worker counted after its last snapshot (at most about a second) is lost. Its
per-worker series start again from zero, which Prometheus' ``rate()`` reads as a reset.

A dead worker is never counted twice: ``retired.msgpack`` lists the pids it absorbed and
is written before the dead worker's file is removed, and a reader reads the worker files
first, then ``retired.msgpack``, skipping worker files whose pid is listed. Whichever
moment a scrape races with the supervisor, it counts the dead worker exactly once.

GPU gauges are not part of snapshots: they describe devices, which every worker sees alike,
so the answering worker reads them live (vivace.monitor.gpu).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Iterable, Iterator

import msgspec
from prometheus_client.metrics_core import Metric

log = logging.getLogger("vivace.monitor.multiproc")

WORKER_LABEL = "worker"
RETIRED_FILE = "retired.msgpack"
# Ground-truth gauges: every worker joins every worker's labels (monitor/quality.py), so
# they agree; max keeps a worker that has not read the newest labels yet from hiding them.
GAUGE_MERGE = {"vivace_model_ready": min, "vivace_drift_statistic": max, "vivace_model_quality": max,
               "vivace_feedback_window_labels": max, "vivace_feature_importance": max, "vivace_group_metric": max,
               "vivace_fairness_difference": max}
SUMMED_TYPES = ("counter", "histogram", "summary", "gaugehistogram")
SUCCESS_SAMPLE = "vivace_request_success_total"


class WireSample(msgspec.Struct, array_like=True):
    name: str
    labels: dict[str, str]
    value: float


class WireFamily(msgspec.Struct, array_like=True):
    name: str
    type: str
    documentation: str
    samples: list[WireSample]


class WorkerSnapshot(msgspec.Struct):
    """One worker's own metric families at `written_at` (seconds since the epoch)."""

    worker: int
    pid: int
    written_at: float
    families: list[WireFamily]


class RetiredCounts(msgspec.Struct):
    """Counters and histograms of workers that died, and the pids they were read from."""

    absorbed_pids: list[int]
    families: list[WireFamily]


class SnapshotError(ValueError):
    """A snapshot file that cannot be decoded (names the file and the problem)."""


def heartbeat_path(run_dir: Path, worker: int) -> Path:
    """Touched by the worker's event loop every interval: its mtime changing means the loop turns."""
    return run_dir / f"worker-{worker}.alive"


def snapshot_path(run_dir: Path, worker: int) -> Path:
    return run_dir / f"worker-{worker}.msgpack"


def to_wire(metrics: Iterable[Metric]) -> list[WireFamily]:
    return [
        WireFamily(m.name, m.type, m.documentation, [WireSample(s.name, dict(s.labels), float(s.value)) for s in m.samples])
        for m in metrics
    ]


def with_worker_label(metrics: Iterable[Metric], worker: int) -> Iterator[Metric]:
    """The same families with label worker="<worker>" on every sample (per-process series)."""
    for metric in metrics:
        labelled = Metric(metric.name, metric.documentation, metric.type)
        for s in metric.samples:
            labelled.add_sample(s.name, {**s.labels, WORKER_LABEL: str(worker)}, s.value)
        yield labelled


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_snapshot(run_dir: Path, worker: int, families: list[WireFamily]) -> None:
    """Publish this process's families as worker `worker` (replacing its previous snapshot)."""
    snapshot = WorkerSnapshot(worker=worker, pid=os.getpid(), written_at=time.time(), families=families)
    _write_atomic(snapshot_path(run_dir, worker), msgspec.msgpack.encode(snapshot))


def _decode(path: Path, kind: type):
    try:
        return msgspec.msgpack.decode(path.read_bytes(), type=kind)
    except msgspec.DecodeError as exc:
        raise SnapshotError(f"{path}: not a valid {kind.__name__} ({exc})") from None


def read_snapshot(path: Path) -> WorkerSnapshot:
    """Decode one worker snapshot; SnapshotError names the file when it is malformed."""
    return _decode(path, WorkerSnapshot)


def read_retired(run_dir: Path) -> RetiredCounts:
    path = run_dir / RETIRED_FILE
    if not path.exists():
        return RetiredCounts(absorbed_pids=[], families=[])
    return _decode(path, RetiredCounts)


def retire_worker(run_dir: Path, worker: int, pid: int) -> bool:
    """Fold the last snapshot of dead worker `worker` (process `pid`) into the retired counts.

    Called by the supervisor only (the one writer of retired.msgpack), after the process
    exited and before its replacement starts. Gauges and per-worker series are dropped.
    Returns False when that process left no snapshot.
    """
    path = snapshot_path(run_dir, worker)
    try:
        snapshot = read_snapshot(path)
    except FileNotFoundError:
        return False
    if snapshot.pid != pid:
        return False
    retired = read_retired(run_dir)
    kept = [
        WireFamily(f.name, f.type, f.documentation, [s for s in f.samples if WORKER_LABEL not in s.labels])
        for f in snapshot.families
        if f.type in SUMMED_TYPES
    ]
    merged = merge([retired.families, kept])
    # Written before the worker file goes away: a reader that still sees the worker file
    # also sees its pid listed here and skips it (see the module docstring).
    _write_atomic(run_dir / RETIRED_FILE, msgspec.msgpack.encode(
        RetiredCounts(absorbed_pids=[*retired.absorbed_pids, pid], families=to_wire(merged))))
    path.unlink(missing_ok=True)
    return True


def merge(sources: Iterable[list[WireFamily]]) -> list[Metric]:
    """Families of several processes merged into one view (rules in the module docstring)."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], list[float]]] = {}
    for source in sources:
        for family in source:
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            slots = values[family.name]
            for s in family.samples:
                slots.setdefault((s.name, tuple(sorted(s.labels.items()))), []).append(s.value)
    out = []
    for name, metric in families.items():
        combine = sum if metric.type in SUMMED_TYPES else GAUGE_MERGE.get(name, sum)
        for (sample_name, labels), vals in values[name].items():
            metric.add_sample(sample_name, dict(labels), combine(vals))
        out.append(metric)
    return out


class WorkerMetrics:
    """Worker `worker`'s side of the run directory: publish own families, merge everyone's."""

    def __init__(self, run_dir: str | Path, worker: int, interval_s: float = 1.0):
        self.run_dir = Path(run_dir)
        self.worker = worker
        self.interval_s = interval_s

    def publish(self, own: list[WireFamily]) -> None:
        write_snapshot(self.run_dir, self.worker, own)

    def beat(self) -> None:
        """Touch this worker's heartbeat file (no data written: works on a full disk)."""
        path = heartbeat_path(self.run_dir, self.worker)
        try:
            os.utime(path)
        except FileNotFoundError:
            path.touch()

    def merged(self, own: list[WireFamily]) -> list[Metric]:
        """This worker's live families merged with the other workers' latest snapshots."""
        others = []
        for path in sorted(self.run_dir.glob("worker-*.msgpack")):
            if path == snapshot_path(self.run_dir, self.worker):
                continue
            try:
                others.append(read_snapshot(path))
            except FileNotFoundError:  # that worker died and was retired meanwhile
                continue
            except (SnapshotError, OSError) as exc:  # one bad file must not break the scrape
                log.warning("skipping worker snapshot: %s", exc)
        # Read after the worker files: see the module docstring for why this order.
        try:
            retired = read_retired(self.run_dir)
        except (SnapshotError, OSError) as exc:
            log.warning("skipping retired worker counts: %s", exc)
            retired = RetiredCounts(absorbed_pids=[], families=[])
        live = [s for s in others if s.pid not in retired.absorbed_pids]
        per_worker = [(self.worker, own), *((s.worker, s.families) for s in live)]
        return [*merge([own, *(s.families for s in live), retired.families]), _worker_success(per_worker)]


def _worker_success(per_worker: list[tuple[int, list[WireFamily]]]) -> Metric:
    """Successful requests per worker process: how SO_REUSEPORT spread the connections."""
    metric = Metric("vivace_worker_request_success", "Successful inference requests answered by each worker process",
                    "counter")
    for worker, families in sorted(per_worker, key=lambda item: item[0]):
        total = sum(s.value for f in families for s in f.samples if s.name == SUCCESS_SAMPLE)
        metric.add_sample("vivace_worker_request_success_total", {WORKER_LABEL: str(worker)}, total)
    return metric
