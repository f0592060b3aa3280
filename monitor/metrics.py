"""Prometheus metrics for the server, read from the native batchers at scrape time.

Nothing is observed per request in Python: the C++ batcher keeps counters and fixed-bucket
histograms with relaxed atomics, and this collector turns them into metric families when
`/metrics` is scraped. Names follow Prometheus conventions: `vivace_` prefix, seconds,
`_total` counters, labels `model` and `version`.

The collector reads a duck-typed source so that `monitor` never imports `engine`: the
source has `runners()` (objects with `name`, `version`, `ready`, `stats()`), `failures`
({(model, version, reason): count}) and `http_errors` ({status: count}).

In a worker of `vivace serve --workers N` (after `share_across_workers`), the collector
also publishes its families to the run directory and answers with every worker's metrics
merged; see `vivace.monitor.multiproc` for the merge rules. GPU gauges come from
`vivace.monitor.gpu` while a model runs on CUDA.
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric

from .gpu import GpuCollector, runs_on_cuda
from .multiproc import WireFamily, WorkerMetrics, to_wire, with_worker_label

log = logging.getLogger("vivace.monitor.metrics")

LABELS = ["model", "version"]
FAILURE_REASONS = ("bad_request", "rejected", "timeout", "backend_error")
HISTOGRAMS = {
    "request_seconds": ("vivace_request_duration_seconds", "Time from enqueue to completion of successful requests"),
    "queue_seconds": ("vivace_queue_duration_seconds", "Time requests wait in the batcher queue"),
    "compute_seconds": ("vivace_compute_duration_seconds", "Time per batch: gather, model, scatter"),
    "batch_size": ("vivace_batch_size", "Rows per executed batch"),
}
COMPUTE_PHASES = {
    "compute_input_ns": ("vivace_compute_input_seconds_total", "Time gathering rows into batch buffers"),
    "compute_infer_ns": ("vivace_compute_infer_seconds_total", "Time running the model"),
    "compute_output_ns": ("vivace_compute_output_seconds_total", "Time scattering outputs to requests"),
}

# The steps of an ensemble (a pipeline served as one model), each counted on its own.
STEP_COUNTERS = (("vivace_step_execution_count", "Batches an ensemble step ran"),
                 ("vivace_step_inference_count", "Rows an ensemble step ran"),
                 ("vivace_step_compute_seconds", "Time an ensemble step ran"))
STEP_KEYS, STEP_SCALES = ("execution_count", "inference_count", "compute_ns"), (1, 1, 1e-9)


def _buckets(bounds: list[float], counts: list[int]) -> list[tuple[str, float]]:
    cumulative, out = 0, []
    for bound, count in zip(bounds, counts):
        cumulative += count
        out.append((repr(float(bound)), cumulative))
    out.append(("+Inf", cumulative + counts[-1]))
    return out


_worker_metrics: WorkerMetrics | None = None


def share_across_workers(run_dir: str | Path, worker: int, interval_s: float = 1.0) -> None:
    """Make this process worker `worker` of a multi-process server sharing `run_dir`.

    Collectors created afterwards (from within the running event loop) publish a snapshot
    every `interval_s` and on every scrape, and scrapes show all workers' metrics merged.
    """
    global _worker_metrics
    _worker_metrics = WorkerMetrics(run_dir, worker, interval_s)


class MetricsCollector:
    """prometheus-client collector over a server's models."""

    def __init__(self, source: Any, workers: WorkerMetrics | None = None):
        self.source = source
        self.workers = workers if workers is not None else _worker_metrics
        self.process = ProcessCollector(namespace="vivace", registry=None)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        # Device-level gauges: the same for every worker, so always read live, never merged.
        self.registry.register(GpuCollector(lambda: any(runs_on_cuda(r) for r in self.source.runners())))
        if self.workers is not None:
            self._loop = asyncio.get_running_loop()
            self._publish_periodically()

    def _publish_periodically(self) -> None:
        try:
            self.workers.beat()  # the supervisor's sign that this worker's loop turns
            self._publish(to_wire(self._own_families()))
        except Exception:  # noqa: BLE001 - a failed round must not end the heartbeat
            log.exception("worker metrics round failed")
        finally:
            self._loop.call_later(self.workers.interval_s, self._publish_periodically)

    def _publish(self, wire: list[WireFamily]) -> None:
        try:
            self.workers.publish(wire)
        except OSError as exc:  # a full disk must not stop the server or fail a scrape; retried next time
            log.warning("cannot publish worker metrics: %s", exc)

    def collect(self) -> Iterator[Metric]:
        own = self._own_families()
        if self.workers is None:
            yield from own
            return
        wire = to_wire(own)
        self._publish(wire)  # what this scrape shows is on disk before it is answered
        yield from self.workers.merged(wire)

    def _own_families(self) -> list[Metric]:
        process = self.process.collect()
        if self.workers is not None:
            process = with_worker_label(process, self.workers.worker)
        return [*self._server_families(), *process]

    def _server_families(self) -> Iterator[Metric]:
        runners = self.source.runners()
        success = CounterMetricFamily("vivace_request_success", "Successful inference requests", labels=LABELS)
        failures = CounterMetricFamily(
            "vivace_request_failure", "Failed inference requests by reason", labels=[*LABELS, "reason"]
        )
        inferences = CounterMetricFamily("vivace_inference_count", "Rows inferred (one per batch row)", labels=LABELS)
        executions = CounterMetricFamily("vivace_execution_count", "Batches executed", labels=LABELS)
        queue_depth = GaugeMetricFamily("vivace_queue_depth", "Requests waiting in the batcher", labels=LABELS)
        ready = GaugeMetricFamily("vivace_model_ready", "1 when the model version accepts requests", labels=LABELS)
        phases = {k: CounterMetricFamily(name, doc, labels=LABELS) for k, (name, doc) in COMPUTE_PHASES.items()}
        histograms = {k: HistogramMetricFamily(name, doc, labels=LABELS) for k, (name, doc) in HISTOGRAMS.items()}
        step_families = [CounterMetricFamily(name, doc, labels=[*LABELS, "step"]) for name, doc in STEP_COUNTERS]
        for runner in runners:
            labels = [runner.name, runner.version]
            s = runner.stats()
            for step in s.get("steps", ()):
                for family, key, scale in zip(step_families, STEP_KEYS, STEP_SCALES):
                    family.add_metric([*labels, step["name"]], step[key] * scale)
            success.add_metric(labels, s["success"])
            inferences.add_metric(labels, s["inference_count"])
            executions.add_metric(labels, s["execution_count"])
            queue_depth.add_metric(labels, s["queued_requests"])
            ready.add_metric(labels, 1.0 if runner.ready else 0.0)
            for key, family in phases.items():
                family.add_metric(labels, s[key] / 1e9)
            for key, family in histograms.items():
                bounds, counts, total = s["histograms"][key]
                family.add_metric(labels, _buckets(bounds, counts), total)
        # Every model starts each known reason at 0, so that rate() works from the first scrape.
        failure_counts = {(r.name, r.version, reason): 0 for r in runners for reason in FAILURE_REASONS}
        failure_counts.update(self.source.failures)
        for (model, version, reason), count in sorted(failure_counts.items()):
            failures.add_metric([model, version, reason], count)
        drift = GaugeMetricFamily(
            "vivace_drift_statistic",
            "Drift of each feature against the reference profile (psi, js, ks, ks_pvalue, wasserstein, drifted)",
            labels=[*LABELS, "feature", "statistic"],
        )
        for runner in runners:
            monitor = getattr(runner, "drift", None)
            if monitor is not None:
                for feature, statistic, value in monitor.gauge_samples():
                    drift.add_metric([runner.name, runner.version, feature, statistic], value)
        yield from self._rollout_families()
        yield from self._quality_families()
        http_errors = CounterMetricFamily("vivace_http_errors", "HTTP error responses by status code", labels=["code"])
        for code, count in sorted(self.source.http_errors.items()):
            http_errors.add_metric([str(code)], count)
        yield success
        yield failures
        yield inferences
        yield executions
        yield queue_depth
        yield ready
        yield from phases.values()
        yield from histograms.values()
        yield from step_families
        yield drift
        yield http_errors

    def _rollout_families(self) -> Iterator[Metric]:
        """Rollouts being served (the server's `rollouts()`: each split's status)."""
        weight = GaugeMetricFamily("vivace_rollout_canary_weight", "Percent of requests a rollout sends to its canary",
                                   labels=["model", "canary"])
        routed = CounterMetricFamily("vivace_rollout_routed", "Requests a rollout routed, by the version chosen",
                                     labels=LABELS)
        shadowed = CounterMetricFamily("vivace_shadow_requests", "Requests copied to a shadow version", labels=LABELS)
        disagreed = CounterMetricFamily("vivace_shadow_label_disagreements",
                                        "Shadow copies whose labels differ from the answer returned", labels=LABELS)
        max_diff = GaugeMetricFamily("vivace_shadow_max_abs_diff",
                                     "Largest output difference between a shadow copy and the answer returned",
                                     labels=LABELS)
        for status in getattr(self.source, "rollouts", list)():
            model = status["ref"].partition("@")[0]
            if status["canary"] is not None:
                weight.add_metric([model, status["canary"]], status["weight"])
            for version, count in status["routed"].items():
                routed.add_metric([model, version], count)
            shadow = status["shadow"]
            if shadow is not None:
                labels = [model, shadow["version"]]
                shadowed.add_metric(labels, shadow["requests"])
                disagreed.add_metric(labels, shadow["label_disagreements"])
                max_diff.add_metric(labels, shadow["max_abs_diff"])
        yield from (weight, routed, shadowed, disagreed, max_diff)


    def _quality_families(self) -> Iterator[Metric]:
        """Ground truth (monitor/quality.py): the source's `quality` monitor, when it has one."""
        quality = getattr(self.source, "quality", None)
        if quality is None:
            return
        samples = quality.gauge_samples()
        families = {
            "quality": GaugeMetricFamily("vivace_model_quality", "Quality over the label window (accuracy, auc, "
                                         "logloss, brier, ece; mae, rmse, bias)", labels=[*LABELS, "metric"]),
            "labels": GaugeMetricFamily("vivace_feedback_window_labels", "Labelled rows in the quality window",
                                        labels=LABELS),
            "feedback": CounterMetricFamily("vivace_feedback_labels", "Labels received, by outcome (joined, "
                                            "duplicates, unknown, mismatched, received)", labels=[*LABELS, "outcome"]),
            "importance": GaugeMetricFamily("vivace_feature_importance", "Permutation importance per feature, in "
                                            "production and at training", labels=[*LABELS, "feature", "source"]),
            "group": GaugeMetricFamily("vivace_group_metric", "Per-group rates of a sensitive attribute",
                                       labels=[*LABELS, "attribute", "group", "metric"]),
            "fairness": GaugeMetricFamily("vivace_fairness_difference", "Max - min across the groups of a sensitive "
                                          "attribute (demographic parity, equal opportunity, error rate)",
                                          labels=[*LABELS, "attribute", "metric"]),
        }
        for key, family in families.items():
            for labels, value in samples[key]:
                family.add_metric(labels, value)
        yield from families.values()


def render_metrics(collector: MetricsCollector) -> tuple[bytes, bytes]:
    """The Prometheus text exposition of everything the collector sees."""
    return generate_latest(collector.registry), CONTENT_TYPE_LATEST.encode()
