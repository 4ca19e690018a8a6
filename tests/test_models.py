"""From a run to a model people use: register it (with an alias), predict with it; the
predictions are the run's, and a bad input is one line with nothing registered."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import compose_config, tiny_overrides
from helpers import client_for, runs_of


@pytest.fixture(scope="module")
def store(tmp_path_factory, image_folder):
    """A run with a logged model, and one without (tracking.log_model=false)."""
    from experiments.train import train

    root = tmp_path_factory.mktemp("models")
    train(compose_config([*tiny_overrides(root, image_folder), "tracking.log_model=true"]))
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    train(
        compose_config(
            [*tiny_overrides(root, image_folder), "tracking.log_model=false", "trainer.seed=3"]
        )
    )
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    with_model, without = runs_of(root, "folder")
    return root, with_model, without


def register(root: Path, *args: str, capsys=None) -> int:
    from experiments.register import main

    return main([*args, "--tracking-uri", f"sqlite:///{root}/mlruns/mlflow.db"])


def test_a_registered_version_carries_its_run_and_an_alias_moves(store, capsys):
    root, run, _ = store
    uri = f"runs:/{run.info.run_id}/model"
    assert register(root, uri, "--name", "clf", "--alias", "champion") == 0
    assert "as clf version 1" in capsys.readouterr().out
    assert register(root, uri, "--name", "clf", "--alias", "champion") == 0
    printed = capsys.readouterr().out
    assert "alias champion -> version 2, which left version 1" in printed
    client = client_for(root)
    version = client.get_model_version_by_alias("clf", "champion")
    assert str(version.version) == "2" and version.run_id == run.info.run_id
    tags = version.tags
    assert float(tags["metric.test_accuracy"]) == pytest.approx(run.data.metrics["test_accuracy"])
    assert tags["source_run_id"] == run.info.run_id and "backbone:" in tags["config"]
    digests = {i.dataset.digest for i in client.get_run(run.info.run_id).inputs.dataset_inputs}
    assert {tags["data.train.digest"], tags["data.test.digest"]} <= digests


def test_the_best_run_is_found_and_a_run_without_a_model_is_refused(store, capsys):
    root, run, without = store
    client = client_for(root)
    before = len(client.search_model_versions("name = 'best'"))
    best = max((run, without), key=lambda r: r.data.metrics["best_val_accuracy"])
    code = register(root, "--best", "folder", "--name", "best")
    if best is run:
        assert code == 0 and f"registered run {run.info.run_id}" in capsys.readouterr().out
    else:  # the best run logged no model: one line, nothing registered
        assert code == 2
    assert register(root, f"runs:/{without.info.run_id}/model", "--name", "best") == 2
    error = capsys.readouterr().err
    assert "logged no model (tracking.log_model=false)" in error
    after = len(client.search_model_versions("name = 'best'"))
    assert after == before + (1 if best is run else 0)


@pytest.mark.parametrize(
    ("model", "says"),
    [
        ("models:/clf@nobody", "the registry has no alias 'nobody' of a model 'clf'"),
        ("models:/nothing/1", "the registry has no version 1 of a model 'nothing'"),
        (f"runs:/{'0' * 32}/model", f"no run {'0' * 32}"),
    ],
)
def test_an_unknown_model_is_one_line(store, model, says, tmp_path):
    root, run, _ = store
    register(root, f"runs:/{run.info.run_id}/model", "--name", "clf", "--alias", "champion")
    result = predict_cli(root, f"model={model}", f"input={tmp_path}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert says in line


def predict_cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "experiments.predict", f"paths.root_dir={root}", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_predict_gives_the_runs_test_accuracy_with_its_recorded_classes(
    store, tmp_path, image_folder
):
    """The test split, copied under names that hide its classes and with a broken file: the
    registered model predicts the run's test accuracy, in the run's class names."""
    from experiments.tasks import load_task

    root, run, _ = store
    register(root, f"runs:/{run.info.run_id}/model", "--name", "clf", "--alias", "champion")
    cfg = compose_config(tiny_overrides(root, image_folder))
    test = load_task(cfg.task, cfg.paths).splits["test"]
    names = sorted(Path(image_folder).iterdir())
    folder = tmp_path / "to_predict"
    truth = {}
    for index, (source, label) in enumerate(zip(test.sources, test.labels, strict=True)):
        target = folder / ("z" if index % 2 else "a") / f"{index:03d}.png"  # not class folders
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(image_folder) / source, target)
        truth[str(target)] = names[label].name
    (folder / "a" / "broken.png").write_text("not an image")
    output = tmp_path / "predictions.csv"
    result = predict_cli(root, "model=models:/clf@champion", f"input={folder}", f"output={output}")
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "1 skipped" in log and "skipping" in log and "broken.png" in log
    rows = list(csv.DictReader(output.open()))
    assert len(rows) == len(test.labels)
    assert {r["class"] for r in rows} <= {"class_0", "class_1", "class_2"}
    assert all(r["class"] == r["top1_class"] for r in rows)
    assert all(float(r["top1_probability"]) >= float(r["top2_probability"]) for r in rows)
    accuracy = sum(r["class"] == truth[r["path"]] for r in rows) / len(rows)
    assert accuracy == pytest.approx(run.data.metrics["test_accuracy"])


def test_predict_refuses_a_folder_without_images(store, tmp_path):
    root, run, _ = store
    register(root, f"runs:/{run.info.run_id}/model", "--name", "clf", "--alias", "champion")
    (tmp_path / "empty").mkdir()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "notes.txt").write_text("hello")
    for folder, says in (("empty", "holds no files"), ("texts", "none of its 1 files")):
        result = predict_cli(root, "model=models:/clf@champion", f"input={tmp_path / folder}")
        assert result.returncode == 2, result.stderr[-2000:]
        (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
        assert says in line
