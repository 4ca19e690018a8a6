"""No selection on test, and no lucky member: which run `register --best` takes, and what
`compare` ranks by."""

from __future__ import annotations

import pytest

from experiments.core.errors import ExperimentError
from experiments.tracking import RunRow
from experiments.tracking import tags as T


def row(run_id, value, start, *, group=None, parent=None, seed=42, fold=None, members=None):
    metric = "saved_val_accuracy"
    tags = {T.RUN_NAME: run_id}
    metrics = {metric: value} if value is not None else {}
    if group:  # a group's parent: its mean and std
        tags |= {T.GROUP: "true", T.MEMBERS: str(members)}
        metrics = {f"{metric}_mean": group[0], f"{metric}_std": group[1]}
    if parent:
        tags[T.PARENT_RUN] = parent
    params = {"trainer.seed": str(seed), "task.fold": str(fold)}
    return RunRow(
        run_id, "1", "digits", run_id, "FINISHED", start, start + 1, tags, params, metrics
    )


@pytest.fixture
def store(monkeypatch):
    """A fake store of FINISHED runs that `best_run` reads through tracking.run_rows."""
    from experiments import tracking

    rows: list[RunRow] = []
    monkeypatch.setattr(tracking, "run_rows", lambda *a, **k: list(rows))
    return rows


def test_best_takes_a_group_by_its_mean_not_its_luckiest_member(store):
    from experiments.comparison.selection import best_run

    store += [
        row("single", 0.85, 1),
        row("group", None, 2, group=(0.84, 0.06), members=2),
        row("lucky", 0.90, 3, parent="group", seed=42),
        row("unlucky", 0.78, 4, parent="group", seed=43),
    ]
    chosen = best_run("digits", "saved_val_accuracy")
    assert chosen.run.run_id == "single" and chosen.group is None


def test_a_best_group_registers_its_member_nearest_the_mean(store):
    from experiments.comparison.selection import best_run

    store += [
        row("single", 0.85, 1),
        row("group", None, 2, group=(0.86, 0.04), members=3),
        row("top", 0.91, 3, parent="group", seed=42),
        row("typical", 0.84, 4, parent="group", seed=43),
        row("low", 0.83, 5, parent="group", seed=44),
    ]
    chosen = best_run("digits", "saved_val_accuracy")
    assert chosen.group.run_id == "group" and chosen.run.run_id == "typical"


def test_ties_go_to_the_earlier_run_then_the_lower_id(store):
    from experiments.comparison.selection import best_run

    store += [row("b-later", 0.9, 5), row("a-earlier", 0.9, 2), row("c-earliest", 0.9, 2)]
    assert best_run("digits", "saved_val_accuracy").run.run_id == "a-earlier"
    store.clear()
    store += [row("m2", None, 1, group=(0.9, 0.0), members=2)]
    store += [row("seed-43", 0.9, 2, parent="m2", seed=43), row("seed-42", 0.9, 3, parent="m2")]
    assert best_run("digits", "saved_val_accuracy").run.run_id == "seed-42"


def test_choosing_by_test_is_refused_unless_allowed(store):
    from experiments.comparison.selection import best_run

    store += [RunRow("r", "1", "digits", "r", "FINISHED", 1, 2, {}, {}, {"test_accuracy": 0.9})]
    with pytest.raises(ExperimentError, match="chooses by the test split.*--allow-test-selection"):
        best_run("digits", "test_accuracy")
    assert best_run("digits", "test_accuracy", allow_test=True).run.run_id == "r"


def test_register_and_compare_refuse_a_test_ranking_in_one_line(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from experiments.compare import main as compare
    from experiments.register import main as register

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(uri).search_experiments()  # a store there: a missing one is refused first
    store = ["--tracking-uri", uri]
    assert compare(["--sort", "test_accuracy", *store]) == 2
    assert "--sort test_accuracy chooses by the test split" in capsys.readouterr().err
    assert compare(["--sort", "nope", *store]) == 2
    assert "--sort nope is not a column" in capsys.readouterr().err
    args = ["--best", "digits", "--metric", "test_accuracy", "--name", "m", *store]
    assert register(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert (
        len(errors) == 1 and "--best --metric test_accuracy chooses by the test split" in errors[0]
    )
