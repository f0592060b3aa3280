"""Metrics of several worker processes (snapshot files, merge, retired workers) and GPU gauges."""
from __future__ import annotations

import asyncio
import logging
import os

import msgspec
import pytest

from conftest import ServerProcess
from vivace.monitor import multiproc
from vivace.monitor.gpu import GpuCollector
from vivace.monitor.multiproc import (RetiredCounts, SnapshotError, WireFamily, WireSample, WorkerMetrics, merge,
                                      read_retired, read_snapshot, retire_worker, snapshot_path, write_snapshot)

MLP = {"model": "mlp", "version": "1"}


def worker_families(success: float, queued: float, ready: float, psi: float, rss: float, worker: int):
    return [
        WireFamily("vivace_request_success", "counter", "ok", [WireSample("vivace_request_success_total", MLP, success)]),
        WireFamily("vivace_request_duration_seconds", "histogram", "latency", [
            WireSample("vivace_request_duration_seconds_bucket", {**MLP, "le": "0.001"}, success - 1),
            WireSample("vivace_request_duration_seconds_bucket", {**MLP, "le": "+Inf"}, success),
            WireSample("vivace_request_duration_seconds_count", MLP, success),
            WireSample("vivace_request_duration_seconds_sum", MLP, success / 1000),
        ]),
        WireFamily("vivace_queue_depth", "gauge", "queued", [WireSample("vivace_queue_depth", MLP, queued)]),
        WireFamily("vivace_model_ready", "gauge", "ready", [WireSample("vivace_model_ready", MLP, ready)]),
        WireFamily("vivace_drift_statistic", "gauge", "drift", [
            WireSample("vivace_drift_statistic", {**MLP, "feature": "f0", "statistic": "psi"}, psi)]),
        WireFamily("vivace_process_resident_memory_bytes", "gauge", "rss", [
            WireSample("vivace_process_resident_memory_bytes", {"worker": str(worker)}, rss)]),
    ]


def values(metrics) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for m in metrics for s in m.samples}


def key(name: str, **labels: str) -> tuple[str, tuple]:
    return name, tuple(sorted(labels.items()))


def test_merge_sums_counters_and_buckets_and_combines_gauges_by_meaning():
    merged = values(merge([worker_families(10, 2, 1, 0.05, 100, 0), worker_families(5, 3, 0, 0.30, 200, 1)]))
    assert merged[key("vivace_request_success_total", **MLP)] == 15
    assert merged[key("vivace_request_duration_seconds_bucket", **MLP, le="0.001")] == 13
    assert merged[key("vivace_request_duration_seconds_bucket", **MLP, le="+Inf")] == 15
    assert merged[key("vivace_request_duration_seconds_count", **MLP)] == 15
    assert merged[key("vivace_queue_depth", **MLP)] == 5            # summed
    assert merged[key("vivace_model_ready", **MLP)] == 0            # ready only if every worker is
    assert merged[key("vivace_drift_statistic", **MLP, feature="f0", statistic="psi")] == 0.30  # the worst share
    assert merged[key("vivace_process_resident_memory_bytes", worker="0")] == 100   # per worker
    assert merged[key("vivace_process_resident_memory_bytes", worker="1")] == 200


def test_scrape_merges_other_workers_snapshots_and_counts_each_worker(tmp_path):
    write_snapshot(tmp_path, 1, worker_families(7, 0, 1, 0.1, 200, 1))
    merged = values(WorkerMetrics(tmp_path, 0).merged(worker_families(3, 0, 1, 0.1, 100, 0)))
    assert merged[key("vivace_request_success_total", **MLP)] == 10
    assert merged[key("vivace_worker_request_success_total", worker="0")] == 3
    assert merged[key("vivace_worker_request_success_total", worker="1")] == 7
    assert [p.name for p in tmp_path.iterdir()] == ["worker-1.msgpack"]  # no temporary file left behind


def test_retired_worker_counts_are_kept_and_never_counted_twice(tmp_path):
    write_snapshot(tmp_path, 1, worker_families(7, 4, 1, 0.1, 200, 1))
    dead_pid = os.getpid()  # write_snapshot records the writer's pid
    stale = snapshot_path(tmp_path, 1).read_bytes()
    assert retire_worker(tmp_path, 1, dead_pid + 1) is False  # not that process's snapshot: untouched
    assert retire_worker(tmp_path, 1, dead_pid) is True
    assert not snapshot_path(tmp_path, 1).exists()
    retired = read_retired(tmp_path)
    assert retired.absorbed_pids == [dead_pid]
    kept = values(merge([retired.families]))
    assert kept[key("vivace_request_success_total", **MLP)] == 7
    assert not any(name in ("vivace_queue_depth", "vivace_process_resident_memory_bytes") for name, _ in kept)

    # A scrape racing with the supervisor may still find the dead worker's file: skipped.
    snapshot_path(tmp_path, 1).write_bytes(stale)
    own = worker_families(3, 0, 1, 0.1, 100, 0)
    merged = values(WorkerMetrics(tmp_path, 0).merged(own))
    assert merged[key("vivace_request_success_total", **MLP)] == 10
    assert merged[key("vivace_queue_depth", **MLP)] == 0  # a dead worker's gauges are gone


def test_malformed_snapshots_name_the_file_and_do_not_break_a_scrape(tmp_path, caplog):
    write_snapshot(tmp_path, 1, worker_families(7, 0, 1, 0.1, 200, 1))
    good = snapshot_path(tmp_path, 1).read_bytes()
    truncated, hostile = snapshot_path(tmp_path, 2), snapshot_path(tmp_path, 3)
    truncated.write_bytes(good[: len(good) // 2])
    hostile.write_bytes(msgspec.msgpack.encode({"worker": "x", "families": [[1, 2]]}))
    for path in (truncated, hostile):
        with pytest.raises(SnapshotError, match=str(path)):
            read_snapshot(path)
    (tmp_path / multiproc.RETIRED_FILE).write_bytes(b"\xc1garbage")
    with caplog.at_level(logging.WARNING, logger="vivace.monitor.multiproc"):
        merged = values(WorkerMetrics(tmp_path, 0).merged(worker_families(3, 0, 1, 0.1, 100, 0)))
    assert merged[key("vivace_request_success_total", **MLP)] == 10  # the good snapshot still counts
    assert "worker-2.msgpack" in caplog.text and "worker-3.msgpack" in caplog.text
    assert "retired.msgpack" in caplog.text
    assert isinstance(read_retired(tmp_path / "empty-dir-never-written"), RetiredCounts)


def test_server_collector_publishes_a_snapshot_and_labels_process_series(tmp_path):
    from vivace.engine.config import ServerConfig
    from vivace.engine.server import App
    from vivace.monitor.metrics import render_metrics

    async def scrape() -> bytes:
        app = App([], ServerConfig())
        app.metrics = type(app.metrics)(app, WorkerMetrics(tmp_path, 4))
        assert read_snapshot(snapshot_path(tmp_path, 4)).pid == os.getpid()  # published at once
        return render_metrics(app.metrics)[0]

    text = asyncio.run(scrape()).decode()
    assert 'vivace_process_cpu_seconds_total{worker="4"}' in text
    assert 'vivace_worker_request_success_total{worker="4"} 0.0' in text


def test_no_gpu_families_without_nvml_and_scraping_works():
    try:
        import pynvml

        pynvml.nvmlInit()
        pytest.skip("NVML works on this machine; the GPU test covers it")
    except Exception:
        pass
    collector = GpuCollector(lambda: True)  # as if a model ran on CUDA
    assert list(collector.collect()) == []
    assert list(collector.collect()) == []  # and NVML is not retried on every scrape


@pytest.mark.gpu
def test_gpu_gauges_while_a_model_runs_on_cuda(mlp_package):
    import http.client

    server = ServerProcess([mlp_package], "--device", "cuda")
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        assert server.stop() == 0
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
               for line in text.splitlines() if line.startswith("vivace_gpu_")}
    assert samples['vivace_gpu_memory_total_bytes{gpu="0"}'] > 0
    assert 0 < samples['vivace_gpu_memory_used_bytes{gpu="0"}'] <= samples['vivace_gpu_memory_total_bytes{gpu="0"}']
    assert 'vivace_gpu_utilization_ratio{gpu="0"}' in samples
