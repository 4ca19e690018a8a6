"""SIGTERM and SIGINT end a run the same way: at a step boundary, checkpointed, KILLED, one line.

`timeout`, SLURM, Kubernetes and `docker stop` send SIGTERM, whose default action ends Python at
once with nothing saved; Ctrl-C sends SIGINT, whose KeyboardInterrupt can land anywhere, e.g.
half-way through writing a checkpoint. Both are handled here instead:

- inside `model.fit` the handler only sets a flag, and `callbacks.StopOnSignal` raises
  `Interrupted` at the next batch boundary, so the last epoch's backup is intact and the run
  resumes from it;
- elsewhere (decoding, evaluation, logging) nothing is half-written by stopping, so the handler
  raises `Interrupted` at once;
- a second signal always raises at once.

The entry point turns `Interrupted` into one line and exit status 128 + signal (130, 143).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

HANDLED = (signal.SIGTERM, signal.SIGINT)


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


_state = {"pending": None, "deferring": 0, "received": None}


def _handle(signum, frame) -> None:
    _state["received"] = signum
    if _state["deferring"] and _state["pending"] is None:
        _state["pending"] = signum  # StopOnSignal raises it at the next batch boundary
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """Route SIGTERM and SIGINT to `Interrupted` for the duration (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = {s: signal.signal(s, _handle) for s in HANDLED}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def received() -> int | None:
    """The last signal this process received, if any."""
    return _state["received"]


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Signals wait for `raise_if_pending` (at fit's batch ends) inside this block."""
    _state["deferring"] += 1
    try:
        yield
    finally:
        _state["deferring"] -= 1
    raise_if_pending()  # a signal that came after the last batch


def raise_if_pending() -> None:
    """Raise the deferred signal, if one came."""
    signum = _state["pending"]
    if signum is not None:
        _state["pending"] = None
        raise Interrupted(signum)
