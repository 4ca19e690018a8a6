"""The figure worker: it draws in a process of its own, the figures it draws are those the run
would draw, and whatever happens to it or to the run, the figures come and no process is left."""

from __future__ import annotations

import logging
import operator
import os
import signal
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import matplotlib
import numpy as np
import pytest
from PIL import Image

from experiments.evaluation import figures


@pytest.fixture
def worker():
    figures.start()
    yield figures._worker
    figures.stop()


def test_calls_are_made_in_a_process_of_their_own(worker):
    drawing = figures.draw([(os.getpid, ()), (operator.add, (2, 3))])
    pid, total = drawing.results()
    assert pid == worker.process.pid != os.getpid()
    assert total == 5


def test_without_a_worker_calls_are_made_here():
    figures.stop()
    assert figures.draw([(os.getpid, ())]).results() == [os.getpid()]


def test_a_call_that_fails_in_the_worker_raises_here_as_it_would(worker, caplog):
    drawing = figures.draw([(operator.truediv, (1, 0))])
    with caplog.at_level(logging.WARNING), pytest.raises(ZeroDivisionError):
        drawing.results()
    assert "ZeroDivisionError" in caplog.text


def test_a_killed_worker_costs_no_figure_and_is_replaced(worker, caplog):
    os.kill(worker.process.pid, signal.SIGKILL)
    worker.process.wait()
    with caplog.at_level(logging.WARNING):
        assert figures.draw([(os.getpid, ())]).results() == [os.getpid()]
    assert "drawing here" in caplog.text
    figures.start()
    assert figures._worker.process.pid != worker.process.pid
    assert figures.draw([(os.getpid, ())]).results() != [os.getpid()]


def test_answers_a_run_never_asked_for_do_not_reach_the_next_run(worker):
    figures.draw([(operator.add, (1, 1))])  # its run stopped before asking
    assert figures.draw([(operator.add, (2, 2))]).results() == [4]


def test_the_worker_draws_the_figures_the_run_would_draw(worker, tmp_path):
    from experiments.evaluation.reports import Evaluation, report_figures

    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(3), 40).astype(np.float32)
    labels = rng.integers(0, 3, 40)
    evaluation = Evaluation(
        0.5, 0.4, labels, probabilities.argmax(1), probabilities.max(1), probabilities
    )
    split = SimpleNamespace(images=rng.integers(0, 255, (40, 16, 16, 3), dtype=np.uint8))
    history = {"loss": [1.0, 0.5], "val_loss": [1.1, 0.7], "accuracy": [0.5, 0.7]}
    names = ["cat", "dog", "bird"]
    matplotlib.use("Agg")
    apart = figures.draw(report_figures(tmp_path / "a", evaluation, split, names, history))
    here = [
        f(*args) for f, args in report_figures(tmp_path / "h", evaluation, split, names, history)
    ]
    drawn = apart.results()
    assert (
        [p.name for p in drawn]
        == [p.name for p in here]
        == [
            "confusion_matrix.png",
            "misclassified.png",
            "reliability.png",
            "learning_curves.png",
        ]
    )
    for a, h in zip(drawn, here, strict=True):
        assert a.parent == tmp_path / "a"
        np.testing.assert_array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(h)))


RUN = """
import os, signal, sys, time
from experiments.evaluation import figures
signal.signal(signal.SIGINT, lambda *_: os._exit(3))  # the run's own handling, quietly
signal.signal(signal.SIGTERM, lambda *_: os._exit(4))
figures.start()
print(figures._worker.process.pid, flush=True)
time.sleep(60)
"""


def _wait_until_ignoring(pid: int, *signums, within: float = 30) -> None:
    """Until the process `pid` ignores `signums` (its SigIgn mask in /proc)."""
    want = sum(1 << (s - 1) for s in signums)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/status") as f:
            ignored = int(next(line for line in f if line.startswith("SigIgn:")).split()[1], 16)
        if ignored & want == want:
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} does not ignore {signums}")


def _gone(pid: int, within: float = 10) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # a zombie of a parent that died is reaped by init; ours is gone when it is one
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split(") ")[1].startswith("Z"):
                return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize(
    "how", ["SIGKILL to the run", "SIGINT to the group", "SIGTERM to the group"]
)
def test_the_worker_ends_with_the_run_whatever_ends_it(how):
    """A run killed outright leaves no worker behind; a signal to the whole process group (Ctrl-C,
    a scheduler) is the run's to handle: the worker neither dies of it nor prints a traceback."""
    run = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(RUN)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        worker = int(run.stdout.readline())
        _wait_until_ignoring(worker, signal.SIGINT, signal.SIGTERM)
        if how == "SIGKILL to the run":
            run.kill()
        else:
            os.killpg(run.pid, getattr(signal, how.split()[0]))
        run.wait(timeout=30)
        assert _gone(worker), f"the worker {worker} outlived the run"
        assert run.stderr.read() == ""
    finally:
        if run.poll() is None:
            run.kill()


def test_a_run_without_the_worker_draws_its_figures_itself(worker, make_config, tmp_path):
    """evaluation.figure_worker=false: the run ends the worker an earlier run of the process
    started, starts none, and still logs every figure."""
    from experiments.pipeline.run import train

    from helpers import client_for, runs_of

    earlier = worker.process
    train(make_config("trainer.epochs=1", "evaluation.figure_worker=false"))
    assert earlier.poll() is not None and figures._worker is None
    (run,) = runs_of(tmp_path, "folder")
    logged = {a.path for a in client_for(tmp_path).list_artifacts(run.info.run_id, "evaluation")}
    names = ("confusion_matrix", "misclassified", "learning_curves", "reliability")
    assert {f"evaluation/{name}.png" for name in names} <= logged
