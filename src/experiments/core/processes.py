"""This process as an owner of runs and trials: who it is, whether an owner still lives, and how
much memory it holds.

A run or a trial records its owner (host, pid, the pid's start time); a later process on the same
host closes or takes over what a dead owner left. One decision, shared by the MLflow runs
(`experiments.tracking`) and the Optuna trials (the sweeper).
"""

from __future__ import annotations

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
            created = psutil.Process(self.pid).create_time()
        except psutil.Error:
            return False
        return not self.started or abs(created - self.started) < 1.0


def this_process() -> Owner:
    import psutil

    return Owner(socket.gethostname(), os.getpid(), psutil.Process().create_time())


def memory_metrics() -> dict[str, float]:
    """This process's peak resident memory so far and its current one, in MB."""
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
    return {"peak_rss_mb": peak, "rss_mb": rss}
