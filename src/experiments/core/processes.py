"""This process as an owner of runs and trials: who it is, whether an owner still lives, and how
much memory it holds.

A run or a trial records its owner (host, pid, the pid's start time); a later process on the same
host closes or takes over what a dead owner left. One decision, shared by the MLflow runs
(`experiments.tracking`) and the Optuna trials (the sweeper).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# The keys an owner is recorded under: an MLflow run's tags, an Optuna trial's user attrs.
RUN_KEYS = ("host", "pid", "pid_started")
TRIAL_KEYS = ("owner_host", "owner_pid", "owner_started")
# Set while this process runs the members of a group (trainer.repeats): its parent run's id.
GROUP_PARENT_ENV = "EXPERIMENTS_GROUP_PARENT_RUN_ID"
# Set by the sweeper for each job it launches: the sweeper process, as "host:pid:started".
LAUNCHER_ENV = "EXPERIMENTS_SWEEPER_PROCESS"


@dataclass(frozen=True)
class Owner:
    """A process on a host; `started` tells it from a later process given the same pid."""

    host: str
    pid: int
    started: float

    def to_dict(self, keys: tuple[str, str, str]) -> dict[str, Any]:
        host, pid, started = keys
        return {host: self.host, pid: self.pid, started: round(self.started, 2)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], keys: tuple[str, str, str]) -> Owner | None:
        """The owner recorded in `values`, or None when it names none."""
        host, pid, started = keys
        try:
            return cls(str(values[host]), int(values[pid]), float(values.get(started) or 0))
        except (KeyError, TypeError, ValueError):
            return None

    def on_this_host(self) -> bool:
        return self.host == socket.gethostname()

    def alive(self) -> bool:
        """False when the owner ran on this host and is gone (a reused pid is not it); True for
        another host's process, which only a heartbeat can tell about."""
        import psutil

        if not self.on_this_host():
            return True
        try:
            process = psutil.Process(self.pid)
            created = process.create_time()
            if process.status() == psutil.STATUS_ZOMBIE:  # killed, not yet reaped
                return False
        except psutil.Error:
            return False
        return not self.started or abs(created - self.started) < 1.0


def this_process() -> Owner:
    import psutil

    return Owner(socket.gethostname(), os.getpid(), psutil.Process().create_time())


def as_text(owner: Owner) -> str:
    return f"{owner.host}:{owner.pid}:{owner.started:.2f}"


def from_text(text: str) -> Owner | None:
    host, _, rest = text.rpartition(":")
    host, _, pid = host.rpartition(":")
    try:
        return Owner(host, int(pid), float(rest))
    except ValueError:
        return None


@contextlib.contextmanager
def stopped_when_launcher_dies(interval: float = 1.0):
    """In a job that the sweeper launched into another process of this host (a joblib worker, a
    submitit local job): when the sweeper is gone (kill -9), the job stops as on SIGTERM, at its
    next batch, checkpointed and its run KILLED, so that the same command's retry of the trial
    resumes it instead of racing a job that trains on, orphaned (joblib's workers outlive their
    parent until their task returns). Nothing to watch in the sweeper's own process or for a
    job on another host (a SLURM job), whose sweeper only a heartbeat can tell about.
    """
    import logging
    import signal
    import threading

    owner = from_text(os.environ.get(LAUNCHER_ENV, ""))
    if owner is None or not owner.on_this_host() or owner.pid == os.getpid():
        yield
        return
    stop, gone = threading.Event(), threading.Event()

    def watch() -> None:
        while not stop.wait(interval):
            if not owner.alive():
                gone.set()
                logging.getLogger(__name__).warning(
                    "the sweeper that launched this job (pid %d) is gone: stopping the job, "
                    "checkpointed; the same sweep command runs its trial again and resumes it",
                    owner.pid,
                )
                os.kill(os.getpid(), signal.SIGTERM)
                return

    watcher = threading.Thread(target=watch, name="launcher-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
        if gone.is_set():  # the run is closed; a worker of a dead launcher only lingers
            os._exit(128 + signal.SIGTERM)


def anon_mb(pid: int | str = "self") -> float | None:
    """The anonymous resident memory of a process (RssAnon: what it holds itself, not the
    files it maps, which the page cache can drop), in MB; None where /proc does not say."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class AnonPeak:
    """The peak anonymous memory of this process and its children (the figure worker), sampled
    every `interval` seconds in a daemon thread. The kernel keeps a peak of the resident memory
    (ru_maxrss) but not of its anonymous part, which is what grows when data is held in memory
    rather than mapped; hence sampling, as `benchmark memory` does."""

    def __init__(self, interval: float = 0.2) -> None:
        import threading

        self.interval = interval
        self.peak = 0.0
        self._thread = threading.Thread(target=self._sample, name="anon-peak", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        import time

        import psutil

        me = psutil.Process()
        while True:
            total = anon_mb() or 0.0
            with contextlib.suppress(psutil.Error):
                total += sum(anon_mb(child.pid) or 0.0 for child in me.children(recursive=True))
            self.peak = max(self.peak, total)
            time.sleep(self.interval)


_anon_peak: list[AnonPeak] = []


def watch_anon_memory() -> None:
    """Start sampling the peak anonymous memory (once a process; Linux only)."""
    if not _anon_peak and anon_mb() is not None:
        _anon_peak.append(AnonPeak())


def memory_metrics() -> dict[str, float]:
    """This process's peak resident memory so far and its current one, in MB, and the peak of
    its anonymous memory and its children's (`peak_anon_mb`) while `watch_anon_memory` runs."""
    import psutil

    rss = psutil.Process().memory_info().rss / 2**20
    try:
        import resource
    except ImportError:  # Windows: psutil reports the peak working set instead
        peak = getattr(psutil.Process().memory_info(), "peak_wset", 0) / 2**20
    else:
        # ru_maxrss is in kilobytes on Linux and in bytes on macOS.
        scale = 1 if sys.platform == "darwin" else 1024
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20
    watched = {"peak_anon_mb": max(_anon_peak[0].peak, anon_mb() or 0.0)} if _anon_peak else {}
    return {"peak_rss_mb": peak, "rss_mb": rss} | watched
