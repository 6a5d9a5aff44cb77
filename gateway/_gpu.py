"""GPU metrics read through NVML on every scrape.

NVML comes from ``pynvml`` (the ``nvidia-ml-py`` package), which is pure
Python and loads ``libnvidia-ml.so.1`` from the NVIDIA driver at run time.
Without the driver, the library or a GPU the collector reports
``aigw_gpu_devices 0``, says why once at info level and never fails a scrape:
a CPU-only gateway is a supported deployment, not an error. Whether a GPU
*should* be there is :attr:`gateway.metrics.Metrics.gpu_expected`, set from
the configuration, so an alert can compare the two.

NVML sees every GPU of the machine, whatever ``CUDA_VISIBLE_DEVICES`` says;
the ``gpu`` label is NVML's device index, a small bounded number.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric

__all__ = ["GpuCollector", "MAX_GPUS"]

log = logging.getLogger(__name__)

#: Devices beyond this index are not exported, which keeps the ``gpu`` label bounded.
MAX_GPUS = 16


class GpuCollector:
    """A Prometheus collector that asks NVML for each GPU's use and memory when scraped.

    Parameters
    ----------
    nvml : module, optional
        An object with pynvml's API (``nvmlInit``, ``nvmlDeviceGetCount``,
        ``nvmlDeviceGetHandleByIndex``, ``nvmlDeviceGetUtilizationRates``,
        ``nvmlDeviceGetMemoryInfo``). Default: ``pynvml``, imported on the
        first scrape. Tests pass a fake.
    """

    def __init__(self, nvml: ModuleType | Any | None = None) -> None:
        self._nvml = nvml
        self._lock = threading.Lock()
        self._ready: bool | None = None  # None: NVML not tried yet
        self._failing: set[int] = set()  # devices whose last query failed (logged once each)

    def describe(self) -> Iterator[Metric]:
        """The metric families, without asking NVML (called when the collector is registered)."""
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        """Query every GPU and yield the families; a device that does not answer is left out."""
        devices, util, used, total = self._families()
        answered = 0
        for index in range(min(self._device_count(), MAX_GPUS)):
            reading = self._read(index)
            if reading is None:
                continue
            answered += 1
            label = [str(index)]
            util.add_metric(label, reading[0])
            used.add_metric(label, reading[1])
            total.add_metric(label, reading[2])
        # Devices that answered, not devices NVML lists: a GPU that fell off the
        # bus must lower the count so the "GPU expected but missing" alert fires.
        devices.add_metric([], answered)
        yield from (devices, util, used, total)

    # ------------------------------------------------------------------ NVML
    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily("aigw_gpu_devices", "GPUs that NVML reports and that answer (0 without NVML or GPU)"),
            GaugeMetricFamily(
                "aigw_gpu_utilization_ratio",
                "Fraction of the last sample period in which a kernel ran on the GPU (NVML)",
                labels=["gpu"],
            ),
            GaugeMetricFamily("aigw_gpu_memory_used_bytes", "GPU memory in use, all processes", labels=["gpu"]),
            GaugeMetricFamily("aigw_gpu_memory_total_bytes", "GPU memory installed", labels=["gpu"]),
        )

    def _init(self) -> bool:
        """Load and initialise NVML once per process; False (logged once) when there is none."""
        with self._lock:
            if self._ready is None:
                try:
                    if self._nvml is None:
                        import pynvml

                        self._nvml = pynvml
                    self._nvml.nvmlInit()
                    self._ready = True
                    log.info("GPU metrics from NVML: %d device(s)", int(self._nvml.nvmlDeviceGetCount()))
                except Exception as exc:
                    # Not retried: without the driver library it would fail the same
                    # way on every scrape, and a CPU-only node is a normal set-up.
                    self._ready = False
                    log.info("no GPU metrics: NVML is not available (%s: %s)", type(exc).__name__, exc)
            return self._ready

    def _device_count(self) -> int:
        if not self._init():
            return 0
        try:
            count = int(self._nvml.nvmlDeviceGetCount())  # type: ignore[union-attr]
        except Exception as exc:
            if -1 not in self._failing:
                self._failing.add(-1)
                log.warning("NVML could not count GPUs: %s: %s", type(exc).__name__, exc)
            return 0
        self._failing.discard(-1)
        return count

    def _read(self, index: int) -> tuple[float, float, float] | None:
        """(utilisation ratio, memory used, memory total) of one device, or None if it does not answer."""
        nvml = self._nvml
        assert nvml is not None
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            rates = nvml.nvmlDeviceGetUtilizationRates(handle)
            mem = nvml.nvmlDeviceGetMemoryInfo(handle)
            reading = (float(rates.gpu) / 100.0, float(mem.used), float(mem.total))
        except Exception as exc:
            if index not in self._failing:
                self._failing.add(index)
                log.warning("GPU %d does not answer NVML queries: %s: %s", index, type(exc).__name__, exc)
            return None
        if index in self._failing:
            self._failing.discard(index)
            log.info("GPU %d answers NVML queries again", index)
        return reading
