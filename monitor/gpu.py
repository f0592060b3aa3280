"""GPU utilisation and memory gauges, read through NVML at scrape time.

Exported only while a served model runs on CUDA, one series per NVML device (label ``gpu``,
NVML's device index, which ignores CUDA_VISIBLE_DEVICES):

    vivace_gpu_utilization_ratio      fraction of the last sample period a kernel ran (0..1)
    vivace_gpu_memory_used_bytes
    vivace_gpu_memory_total_bytes

NVML comes from the optional package nvidia-ml-py (module ``pynvml``), imported on first
use. No package, no driver, or a failing call means no GPU families, never a failed scrape.
A device that does not report utilisation (a MIG-partitioned GPU) still reports memory.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterator

from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger("vivace.monitor.gpu")


class GpuCollector:
    """prometheus-client collector of NVML device gauges, active while `uses_gpu()` is true."""

    def __init__(self, uses_gpu: Callable[[], bool]):
        self.uses_gpu = uses_gpu
        self._nvml: Any = None
        self._unavailable = False  # NVML failed to load once: do not retry on every scrape

    def _load(self) -> Any:
        if self._nvml is None and not self._unavailable:
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml
            except Exception as exc:  # ImportError, or NVMLError when there is no driver
                self._unavailable = True
                log.info("no GPU metrics: NVML unavailable (%s)", exc)
        return self._nvml

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if not self.uses_gpu():
            return
        nvml = self._load()
        if nvml is None:
            return
        utilization = GaugeMetricFamily("vivace_gpu_utilization_ratio",
                                        "Fraction of the last sample period a kernel ran on the GPU", labels=["gpu"])
        used = GaugeMetricFamily("vivace_gpu_memory_used_bytes", "GPU memory in use", labels=["gpu"])
        total = GaugeMetricFamily("vivace_gpu_memory_total_bytes", "GPU memory installed", labels=["gpu"])
        try:
            count = nvml.nvmlDeviceGetCount()
            for index in range(count):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                used.add_metric([str(index)], float(memory.used))
                total.add_metric([str(index)], float(memory.total))
                try:
                    utilization.add_metric([str(index)], nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
                except nvml.NVMLError:  # not supported on this device (MIG)
                    pass
        except nvml.NVMLError as exc:
            log.warning("no GPU metrics this scrape: %s", exc)
            return
        yield utilization
        yield used
        yield total


def runs_on_cuda(runner: Any) -> bool:
    """Whether a served model's backend runs on a CUDA device (duck-typed: backend.device)."""
    device = getattr(getattr(runner, "backend", None), "device", None)
    return getattr(device, "type", str(device)).startswith("cuda") if device is not None else False
