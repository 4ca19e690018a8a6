"""Repeats (`trainer.repeats`): one parent run with the aggregate and a child per seed; the
statistics checked against numpy and scipy; a group killed (SIGTERM, kill -9) and run again ends
with exactly its children, each epoch logged once."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from conftest import tiny_overrides
from helpers import client_for, runs_of

REPEATS = 3
EPOCHS = 6


def group_command(root: Path, folder: Path, *extra: str) -> list[str]:
    overrides = [o for o in tiny_overrides(root, folder) if not o.startswith("trainer.epochs")]
    return [
        sys.executable, "-m", "experiments.train", *overrides, f"trainer.epochs={EPOCHS}",
        f"trainer.repeats={REPEATS}", "strategy=two_stage", "tracking.log_model=false", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def group(tmp_path_factory, image_folder):
    """A store with two groups of the same seeds: lr 3e-3 (the tiny default), then 1e-3."""
    root = tmp_path_factory.mktemp("group")
    for lr in ("3e-3", "1e-3"):
        done = subprocess.run(
            group_command(root, image_folder, f"optimizer.lr={lr}"),
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    return root


def parents(root: Path):
    runs = runs_of(root, "folder")
    return [r for r in runs if r.data.tags.get("group") == "true"]


def parent_and_children(root: Path, which: int = 0):
    runs = runs_of(root, "folder")
    parent = parents(root)[which]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return parent, children


def test_a_group_is_a_parent_with_a_child_per_seed(group):
    parent, children = parent_and_children(group)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["seeds"] == "42,43,44" and parent.data.tags["members"] == "3"
    assert sorted(c.info.run_name for c in children) == ["seed-42", "seed-43", "seed-44"]
    assert sorted(c.data.params["trainer.seed"] for c in children) == ["42", "43", "44"]
    assert all(c.info.status == "FINISHED" for c in children)
    assert parent.info.run_name.endswith(" x3 seeds")
    assert "test_accuracy: " in parent.data.tags["mlflow.note.content"]


def test_the_aggregate_is_numpys_and_scipys(group):
    parent, children = parent_and_children(group)
    metrics = parent.data.metrics
    for name in ("test_accuracy", "best_val_accuracy", "test_ece", "train_time_s"):
        values = np.array([c.data.metrics[name] for c in children])
        assert metrics[f"{name}_mean"] == pytest.approx(values.mean())
        assert metrics[f"{name}_std"] == pytest.approx(values.std(ddof=1))
        low, high = stats.t.interval(
            0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values)
        )
        assert metrics[f"{name}_ci95_low"] == pytest.approx(low)
        assert metrics[f"{name}_ci95_high"] == pytest.approx(high)
    # The value a sweeper would get: the mean of the members' best val_accuracy.
    best = [c.data.metrics["best_val_accuracy"] for c in children]
    assert metrics["val_accuracy_mean"] == pytest.approx(np.mean(best))
    assert metrics["val_accuracy_std"] == pytest.approx(np.std(best, ddof=1))
    # The per-epoch curves: their mean over the seeds, step by step.
    client = client_for(group)
    curve = {m.step: m.value for m in client.get_metric_history(parent.info.run_id, "val_loss")}
    for step in range(EPOCHS):
        values = [
            {m.step: m.value for m in client.get_metric_history(c.info.run_id, "val_loss")}[step]
            for c in children
        ]
        assert curve[step] == pytest.approx(np.mean(values))
    assert not [k for k in metrics if k.startswith("system/")]  # its members sample the system


def test_compare_shows_a_group_as_one_row_and_tests_two_groups(group, capsys):
    import pandas as pd

    from experiments.compare import main as compare

    first, second = parents(group)
    store = ["--tracking-uri", f"sqlite:///{group}/mlruns/mlflow.db", "--out", str(group)]
    assert compare(["folder", *store]) == 0
    printed = capsys.readouterr().out
    table = pd.read_csv(group / "comparison-folder.csv")
    assert len(table) == 2 and list(table["n"]) == [3, 3]  # the members are not rows
    row = table.set_index("run_id").loc[first.info.run_id[:8]]
    assert row["test_accuracy"] == pytest.approx(first.data.metrics["test_accuracy_mean"])
    assert row["test_accuracy_std"] == pytest.approx(first.data.metrics["test_accuracy_std"])
    mean, std = first.data.metrics["test_accuracy_mean"], first.data.metrics["test_accuracy_std"]
    assert f"{mean:.4g} ± {std:.2g} (3)" in printed
    assert compare(["--significance", first.info.run_id, second.info.run_id, *store]) == 0
    line = capsys.readouterr().out.strip()
    a = [c.data.metrics["test_accuracy"] for c in sorted_children(group, 0)]
    b = [c.data.metrics["test_accuracy"] for c in sorted_children(group, 1)]
    expected = stats.ttest_rel(a, b)
    assert "paired t-test over seeds 42, 43, 44" in line
    if np.isfinite(expected.pvalue):
        assert f"p = {expected.pvalue:.4g}" in line
    assert compare(["--significance", first.info.run_id, "nope", *store]) == 2


def sorted_children(root: Path, which: int):
    _, children = parent_and_children(root, which)
    return sorted(children, key=lambda c: int(c.data.params["trainer.seed"]))


def test_significance_is_welch_when_the_seeds_differ(monkeypatch):
    from experiments import compare

    values = {"a": {1: 0.90, 2: 0.92, 3: 0.91}, "b": {7: 0.80, 8: 0.86}}
    monkeypatch.setattr(compare, "group_members", lambda run, metric: values[run])
    line = compare.significance("a", "b", "test_accuracy")
    expected = stats.ttest_ind([0.90, 0.92, 0.91], [0.80, 0.86], equal_var=False)
    assert "Welch's t-test" in line and f"p = {expected.pvalue:.4g}" in line
    assert "difference +0.0800" in line


def finished_count(root: Path) -> int:
    database = root / "mlruns" / "mlflow.db"
    if not database.is_file():
        return 0
    try:
        with sqlite3.connect(database) as db:
            return db.execute("select count(*) from runs where status = 'FINISHED'").fetchone()[0]
    except sqlite3.Error:
        return 0


def saved_epochs(root: Path) -> int:
    from experiments.checkpoints import RunCheckpoints

    folders = (root / "checkpoints").glob("*")
    return max((RunCheckpoints(p).completed_epochs() for p in folders), default=0)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_killed_group_completes_with_exactly_its_children(signum, tmp_path, image_folder):
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(
        group_command(tmp_path, image_folder), stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 300
    # The first seed finished, the second one mid-training.
    while not (finished_count(tmp_path) >= 1 and saved_epochs(tmp_path) >= 2):
        assert process.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)
    process.send_signal(signum)
    process.wait(timeout=60)
    log.close()
    cut = runs_of(tmp_path, "folder")
    assert 1 <= sum(r.info.status == "FINISHED" for r in cut) < REPEATS  # cut mid-group
    again = subprocess.run(
        group_command(tmp_path, image_folder), capture_output=True, text=True, timeout=900
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(parents(tmp_path)) == 1  # the group's parent was continued, not opened again
    parent, children = parent_and_children(tmp_path)
    assert parent.info.status == "FINISHED" and parent.data.tags.get("resumed") == "true"
    assert len(children) == REPEATS
    assert all(c.info.status == "FINISHED" for c in children)
    assert sorted(c.data.params["trainer.seed"] for c in children) == ["42", "43", "44"]
    client = client_for(tmp_path)
    for child in children:
        logged = [m.step for m in client.get_metric_history(child.info.run_id, "loss")]
        assert sorted(logged) == list(range(EPOCHS)), (child.info.run_name, logged)
