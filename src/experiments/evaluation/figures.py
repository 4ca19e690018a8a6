"""A run's figures, drawn by a worker process on another core while the run records the rest.

Matplotlib draws in Python, holding the GIL: the five figures of a quickstart sweep's trial took
0.45-0.6 s, most of what it spent recording, and drawing them in a thread beside the model's
saving gained nothing. A worker process draws them while this one saves and logs the model. It
is started as the first run of a process builds its model, so that importing matplotlib overlaps
training, and it serves every later run of the process (the trials of a sweep).

The worker is a plain child process (`python -c ...`) that reads pickled calls from a pipe and
writes their pickled results to another, rather than `multiprocessing` or a `concurrent.futures`
process pool: their spawned children first import the parent's `__main__` (the train command's
Hydra app; a script read from stdin, which fails), and the pool's queues hold named semaphores
that its resource tracker reports as leaked whenever the run's process ends without shutting
the pool down (a killed run, or the exit without teardown, `cli.ending_without_teardown`).

The worker ends when the run's process closes its end of the pipe, on purpose or by ending,
however it ends. It ignores the signals that stop a run (`interrupts.HANDLED`): Ctrl-C and a
scheduler's SIGTERM reach the whole process group, and the run handles them. A call the worker
could not make (no worker, it died, or the call failed there) is made here, where it draws as it
would have or raises as it would have.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import itertools
import logging
import os
import pickle
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

Call = tuple[Callable[..., Any], tuple]


@dataclass
class _Worker:
    process: subprocess.Popen
    calls: BinaryIO  # where this process writes calls
    answers: BinaryIO  # where it reads their results


_worker: _Worker | None = None
_serials = itertools.count(1)


def start() -> None:
    """Start the worker unless one runs. Where no process can be started, the figures are
    drawn here."""
    global _worker
    if _worker is not None and _worker.process.poll() is None:
        return
    stop()
    calls_read, calls_write = os.pipe()
    answers_read, answers_write = os.pipe()
    command = (
        f"from experiments.evaluation.figures import serve; serve({calls_read}, {answers_write})"
    )
    # The worker imports what this process can: the same modules, from the same places
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    try:
        process = subprocess.Popen(
            [sys.executable, "-c", command],
            stdin=subprocess.DEVNULL,
            pass_fds=(calls_read, answers_write),
            env=env,
        )
    except OSError as err:
        log.info("figures are drawn in the run's process: no worker (%s)", err)
        for fd in (calls_read, calls_write, answers_read, answers_write):
            os.close(fd)
        return
    os.close(calls_read)  # the worker's ends: only it holds them now
    os.close(answers_write)
    _stop_at_exit()
    _worker = _Worker(process, os.fdopen(calls_write, "wb"), os.fdopen(answers_read, "rb"))


@functools.cache
def _stop_at_exit() -> None:
    atexit.register(stop)


def stop() -> None:
    """End the worker, if one was started."""
    if _worker is not None:
        _discard(_worker)


def _discard(worker: _Worker) -> None:
    """End `worker`: the next run starts another."""
    global _worker
    if _worker is worker:
        _worker = None
    for pipe in (worker.calls, worker.answers):
        with contextlib.suppress(OSError):  # a call half-written when the worker died
            pipe.close()  # the worker reads the end of its calls and returns
    try:
        worker.process.wait(timeout=5)
    except subprocess.TimeoutExpired:  # still drawing: its results are not wanted
        worker.process.kill()
        worker.process.wait()


class Drawing:
    """Calls sent to the worker; `results()` waits for them."""

    def __init__(self, calls: Sequence[Call], worker: _Worker | None, serial: int = 0):
        self.calls = list(calls)
        self._worker = worker
        self._serial = serial

    def results(self) -> list:
        """Each call's return value, in order: from the worker, or made here."""
        answers = self._answers()
        if any(answer is _NOT_MADE for answer in answers):
            import matplotlib

            matplotlib.use("Agg")  # as the worker draws: to files, without a display
        return [
            function(*args) if answer is _NOT_MADE else answer
            for (function, args), answer in zip(self.calls, answers, strict=True)
        ]

    def _answers(self) -> list:
        worker, self._worker = self._worker, None
        if worker is None:
            return [_NOT_MADE] * len(self.calls)
        try:
            while True:  # answers to calls whose run stopped before asking for them come first
                serial, answers = pickle.load(worker.answers)
                if serial == self._serial:
                    break
        except (EOFError, OSError, pickle.UnpicklingError):  # the worker died
            log.warning("the figure worker ended (exit code %s); drawing here", _exit(worker))
            _discard(worker)
            return [_NOT_MADE] * len(self.calls)
        except BaseException:  # a signal while waiting: the worker goes with the run
            _discard(worker)
            raise
        for (function, _), answer in zip(self.calls, answers, strict=True):
            if isinstance(answer, Failed):
                log.warning(
                    "drawing %s in the figure worker failed (%s); drawing here",
                    function.__name__,
                    answer.error,
                )
        return [_NOT_MADE if isinstance(answer, Failed) else answer for answer in answers]


def draw(calls: Sequence[Call]) -> Drawing:
    """Send `calls`, each a picklable `(function, arguments)`, to the worker if one was
    started; else they are made here when their results are asked for."""
    worker, serial = _worker, next(_serials)
    if worker is not None:
        try:
            message = pickle.dumps((serial, list(calls)), protocol=pickle.HIGHEST_PROTOCOL)
            worker.calls.write(message)
            worker.calls.flush()
        except Exception as err:  # a call that does not pickle, or the worker died
            log.warning("the figure worker could not take the figures (%s); drawing here", err)
            _discard(worker)
            worker = None
    return Drawing(calls, worker, serial)


def _exit(worker: _Worker):
    try:
        return worker.process.wait(timeout=1)
    except subprocess.TimeoutExpired:
        return None


class Failed:
    """A call that raised in the worker, made again in the run's process."""

    def __init__(self, error: str):
        self.error = error


_NOT_MADE = object()


def serve(calls_fd: int, answers_fd: int) -> None:
    """The worker: make each list of calls it reads and write back their results, until the run's
    process closes the pipe."""
    from experiments.core.interrupts import HANDLED

    for signum in HANDLED:
        signal.signal(signum, signal.SIG_IGN)
    # Behind the run for the CPU: its warm-up runs while the run builds and compiles
    with contextlib.suppress(OSError):
        os.nice(10)
    _warm_up()
    with os.fdopen(calls_fd, "rb") as calls_in, os.fdopen(answers_fd, "wb") as answers_out:
        while True:
            try:
                serial, calls = pickle.load(calls_in)
            except (EOFError, pickle.UnpicklingError):  # the run's process closed it, or ended
                return
            answers = []
            for function, args in calls:
                try:
                    answers.append(function(*args))
                except Exception as err:  # made again in the run's process, which reports it
                    answers.append(Failed(f"{type(err).__name__}: {err}"))
            try:
                pickle.dump((serial, answers), answers_out, protocol=pickle.HIGHEST_PROTOCOL)
                answers_out.flush()
            except BrokenPipeError:  # the run's process no longer waits for them
                return


def _warm_up() -> None:
    """What the first figures would pay for, paid while the run trains: matplotlib's and
    scikit-learn's imports, the fonts (1 s of the first trial's figures on this project's
    CPU)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import sklearn.metrics  # noqa: F401 - the confusion matrix's display

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.set_title("warm-up")
    ax.text(0.5, 0.5, "0123456789", ha="center")
    fig.tight_layout()
    fig.savefig(io.BytesIO(), format="png")
    plt.close(fig)
