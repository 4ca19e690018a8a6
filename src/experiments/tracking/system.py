"""A training run's system metrics (CPU, memory, disk, network, and NVIDIA GPUs where
`nvidia-ml-py` finds one), taken by MLflow's own monitors and shown in the UI's "System metrics"
tab.

MLflow's `SystemMetricsMonitor` logs from its own thread straight to the server: a lost server
stops it for good, and a run shorter than its interval gets nothing. Ours samples the same
monitors in a daemon thread that only collects; the run logs the samples from its main thread
(at each epoch's end and at its end) through its outbox, like every other record, so that a lost
server keeps them and a signal never lands in the sampling thread.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("experiments.tracking")

PREFIX = "system/"  # where the UI looks for them


def _monitors() -> list:
    """MLflow's monitors for this machine: CPU and memory, disk, network, and a GPU monitor
    where one can start (NVIDIA through NVML, else AMD through ROCm)."""
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor
    from mlflow.system_metrics.metrics.rocm_monitor import ROCMMonitor

    monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
    for gpu in (GPUMonitor, ROCMMonitor):
        try:
            monitors.append(gpu())
            break
        except Exception as err:  # no such GPU or library here: CPU metrics only
            log.debug("no %s system metrics: %s", gpu.__name__, err)
    return monitors


class SystemSampler:
    """Samples the system every `interval_s` seconds (and once more when stopped), keeping the
    samples until `drain` hands them over; step numbers start at `first_step`."""

    def __init__(self, interval_s: float, first_step: int = 0):
        import psutil

        psutil.cpu_percent()  # its first reading is 0.0: start its clock now
        self.interval_s = interval_s
        self.monitors = _monitors()
        self.step = first_step
        self._samples: list[tuple[int, int, dict[str, float]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped, daemon=True)
        self._thread.name = "system-metrics"
        self._thread.start()

    def _sample_until_stopped(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        """Read every monitor once and keep the reading as the next step."""
        metrics: dict[str, float] = {}
        for monitor in self.monitors:
            try:
                monitor.collect_metrics()
                metrics |= {PREFIX + k: float(v) for k, v in monitor.aggregate_metrics().items()}
            except Exception as err:  # a device that went away must not end the run
                log.debug("system metrics of %s not read: %s", type(monitor).__name__, err)
            finally:
                monitor.clear_metrics()
        with self._lock:
            self._samples.append((int(time.time() * 1000), self.step, metrics))
            self.step += 1

    def drain(self) -> list[tuple[int, int, dict[str, float]]]:
        """The samples taken since the last call: (unix ms, step, metrics) each."""
        with self._lock:
            samples, self._samples = self._samples, []
        return samples

    def stop(self) -> None:
        """Stop sampling, after a last sample: a run shorter than the interval still has one."""
        self._stop.set()
        self._thread.join(timeout=10)
        self.sample()
