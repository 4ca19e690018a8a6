"""Where a run's time goes: start-up, data, building, compiling, training, evaluating, recording.

Each run records its phases as metrics (`time_<phase>_s`, `time_total_s`, `train_fraction`) and
says them in its last log line, so a slow run shows where to look.

Compiling is measured where the backend says it: on JAX, the seconds of its compile events
while the model trains (`core.compile_cache.jax_compile_seconds`). Elsewhere it is estimated
from each fit's first epoch, its excess over the median of the other epochs of that fit (Keras
compiles the train and test steps as the first epoch runs), and tagged as an estimate. Where
neither can say (TensorFlow, every fit of one epoch) it is left unrecorded, never recorded as 0,
and the training time holds it.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

# In the order a run goes through them; the log line and the metrics follow it.
PHASES = ("startup", "data", "build", "compile", "train", "evaluate", "record")
LABELS = {
    "startup": "start-up",
    "data": "data",
    "build": "building",
    "compile": "compiling",
    "train": "training",
    "evaluate": "evaluating",
    "record": "recording",
}

_process_started_at: float | None = None


def startup_seconds() -> float:
    """Seconds from this process's start to now, the first time it is asked; 0 later (the next
    jobs of a sweep in the same process start nothing)."""
    global _process_started_at
    if _process_started_at is not None:
        return 0.0
    import psutil

    _process_started_at = psutil.Process().create_time()
    return max(time.time() - _process_started_at, 0.0)


class Phases:
    """A stopwatch per phase of one run."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        # How the compile time was had: "measured", "estimated"; None while unknown.
        self.compile_source: str | None = None
        self.started = time.perf_counter()
        self.seconds["startup"] = startup_seconds()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        if name not in PHASES:
            raise ValueError(f"unknown phase {name!r}")
        self.seconds[name] += seconds

    def split_compile(self, epoch_seconds: list[list[float]], measured: float | None = None):
        """Move the compile time of training from training to compiling: `measured` seconds
        where the backend counted them, else estimated from `epoch_seconds` (the epoch times of
        each fit, in order), which needs a fit of two or more epochs; else unknown."""
        if measured is not None:
            self.compile_source = "measured"
            compiled = measured
        elif any(len(times) >= 2 for times in epoch_seconds):
            self.compile_source = "estimated"
            compiled = 0.0
            for times in epoch_seconds:
                if len(times) >= 2:
                    rest = sorted(times[1:])
                    median = rest[len(rest) // 2]
                    compiled += max(times[0] - median, 0.0)
        else:
            self.compile_source = None  # unknown: left in training, not recorded
            return
        compiled = min(compiled, self.seconds["train"])
        self.seconds["compile"] += compiled
        self.seconds["train"] -= compiled

    def known(self, phase: str) -> bool:
        """Whether the phase's time is known (compiling's may not be: `split_compile`)."""
        return phase != "compile" or self.compile_source is not None

    def metrics(self) -> dict[str, float]:
        """`time_<phase>_s` for every phase, `time_total_s` (the process start counted for its
        first run) and `train_fraction`: the share of the run's own time spent training."""
        total = sum(self.seconds[p] for p in PHASES)
        run = total - self.seconds["startup"]
        out = {f"time_{p}_s": round(self.seconds[p], 3) for p in PHASES if self.known(p)}
        out["time_total_s"] = round(total, 3)
        out["train_fraction"] = round(self.seconds["train"] / run, 4) if run > 0 else 0.0
        return out

    def line(self) -> str:
        """One line: the total, then each phase in seconds."""
        metrics = self.metrics()
        parts = ", ".join(
            f"{LABELS[p]} {self.seconds[p]:.1f}" if self.known(p) else f"{LABELS[p]} unknown"
            for p in PHASES
        )
        return (
            f"time {metrics['time_total_s']:.1f} s: {parts} "
            f"({metrics['train_fraction']:.0%} of the run training)"
        )
