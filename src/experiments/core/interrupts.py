"""SIGTERM, SIGINT and SIGUSR2 end a run the same way: at a step boundary, checkpointed, KILLED,
one line.

`timeout`, SLURM, Kubernetes and `docker stop` send SIGTERM, whose default action ends Python at
once with nothing saved; Ctrl-C sends SIGINT, whose KeyboardInterrupt can land anywhere, e.g.
half-way through writing a checkpoint; SLURM warns of preemption and of the time limit with
SIGUSR2 (submitit's `signal_delay_s`). All are handled here instead:

- inside `model.fit` the handler only sets a flag, and `callbacks.StopOnSignal` raises
  `Interrupted` at the next batch boundary, so the last epoch's backup is intact and the run
  resumes from it;
- inside a call to the MLflow store or the Optuna storage the signal waits for the call to end
  (milliseconds): an exception in the middle of an sqlite write leaves its transaction open and
  the store locked, and the run could not be closed;
- elsewhere (decoding, building, evaluation) nothing is half-written by stopping (cache files
  are renamed into place when complete), so the handler raises `Interrupted` at once.

The entry point turns `Interrupted` into one line and exit status 128 + signal (130, 143).
Inside a launcher's job that handles the signal itself (hydra-submitit-launcher requeues a job
on SIGUSR2), the run is closed first, then the launcher's handler is called (`pass_on`).
"""

from __future__ import annotations

import contextlib
import functools
import signal
import threading
from collections.abc import Callable, Iterator

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)


class Interrupted(BaseException):  # noqa: N818 - named like KeyboardInterrupt, which it replaces
    """A run stopped by a signal. BaseException, so no `except Exception` swallows it."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


_state = {"pending": None, "deferring": 0, "received": None, "outer": {}}


def _handle(signum, frame) -> None:
    _state["received"] = signum
    if _state["deferring"]:
        _state["pending"] = signum  # raised where it is safe: see deferred()
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """Route SIGTERM and SIGINT to `Interrupted` for the duration (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = {s: signal.signal(s, _handle) for s in HANDLED}
    outer = _state["outer"]
    if not outer:  # the handlers in place before ours, for pass_on
        outer.update({s: h for s, h in previous.items() if h is not _handle})
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if all(h is not _handle for h in previous.values()):
            outer.clear()


def pass_on(signum: int) -> None:
    """Call the Python handler that `signum` had before ours, if any, once the run is closed.

    submitit's handler for SIGUSR2 saves the job and requeues it (the same command resumes the
    run from its checkpoint); Python's own SIGINT handler and the default actions are left out.
    """
    handler = _state["outer"].get(signum)
    if callable(handler) and handler is not signal.default_int_handler:
        handler(signum, None)


def received() -> int | None:
    """The last signal this process received, if any."""
    return _state["received"]


@contextlib.contextmanager
def deferred(hold: bool = False) -> Iterator[None]:
    """Signals inside this block wait for its end (or for `raise_if_pending`, at fit's batch
    ends). Blocks nest: a signal is raised when the outermost one ends, unless `hold` keeps it
    pending for the caller's next `raise_if_pending`."""
    _state["deferring"] += 1
    try:
        yield
    finally:
        _state["deferring"] -= 1
    if not _state["deferring"] and not hold:
        raise_if_pending()


def uninterrupted(function: Callable) -> Callable:
    """Run `function` inside `deferred()`: for calls that write to a store."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with deferred():
            return function(*args, **kwargs)

    return wrapper


def raise_if_pending() -> None:
    """Raise the deferred signal, if one came."""
    signum = _state["pending"]
    if signum is not None:
        _state["pending"] = None
        raise Interrupted(signum)
