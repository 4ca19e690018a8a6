"""What every run records in MLflow, read back with MlflowClient; evaluate and compare."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments.pipeline import validation
from experiments.pipeline.run import train
from experiments.tracking import flatten
from experiments.training import strategies

from conftest import IMAGE_SIZE, compose_config, tiny_overrides
from helpers import MlflowServer, client_for, runs_of

# What optimized_metric may name (refused before any work otherwise) is what a run records.
EPOCH_METRICS = list(validation.EPOCH_METRICS)
FINAL_METRICS = [
    "test_loss",
    "test_accuracy",
    "best_val_accuracy",
    "train_time_s",
    "total_params",
    "trainable_params",
    "model_size_mb",
    "skipped_files",
    "turned_files",
    "peak_rss_mb",
    "rss_mb",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, image_folder):
    """One inline run with the reference augmentation, recorded in a sqlite store."""
    root = tmp_path_factory.mktemp("tracked")
    cfg = compose_config([*tiny_overrides(root, image_folder), "augmentation=reference"])
    train(cfg)
    (run,) = runs_of(root, "folder")
    return root, cfg, run


@pytest.mark.backends
def test_run_records_params_tags_and_metrics(tiny_run):
    from omegaconf import OmegaConf

    root, cfg, run = tiny_run
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "folder-vgg16-inline-reference"
    container = OmegaConf.to_container(cfg, resolve=True)
    assert run.data.params == flatten(container)
    assert run.data.params["head.units"] == "[32]" and run.data.params["trainer.epochs"] == "3"
    tags = run.data.tags
    assert {tags[k] for k in ("task", "backbone", "strategy", "augmentation")} == {
        "folder",
        "vgg16",
        "inline",
        "reference",
    }
    assert tags["augmentation_applied"] == "true"
    assert tags["pid"] == str(os.getpid()) and tags["host"]
    backend = tags["backend"]
    assert backend == os.environ.get("KERAS_BACKEND", "tensorflow")
    for key in (
        "python_version",
        f"{backend}_version",
        "keras_version",
        "device",
        "hydra_output_dir",
    ):
        assert tags[key], key
    assert tags["device"].startswith(("CPU", "GPU"))
    client = client_for(root)
    for name in EPOCH_METRICS:
        history = client.get_metric_history(run.info.run_id, name)
        assert [m.step for m in history] == [0, 1, 2], name
    for name in FINAL_METRICS + list(validation.FINAL_METRICS):
        assert name in run.data.metrics, name
    assert run.data.metrics["total_params"] == 14_714_688 + 512 * 32 + 32 + 33 * 3
    assert run.data.metrics["trainable_params"] == 512 * 32 + 32 + 33 * 3
    # TensorFlow and VGG16 alone hold well over 200 MB; the peak is never below the current.
    assert run.data.metrics["peak_rss_mb"] >= run.data.metrics["rss_mb"] > 200


def test_run_records_lineage_and_artifacts(tiny_run):
    root, _, run = tiny_run
    client = client_for(root)
    contexts = sorted(
        next(t.value for t in d.tags if t.key == "mlflow.data.context")
        for d in run.inputs.dataset_inputs
    )
    assert contexts == ["test", "train", "val"]
    assert all(d.dataset.digest for d in run.inputs.dataset_inputs)

    def listing(path=None):
        out = []
        for item in client.list_artifacts(run.info.run_id, path):
            out += listing(item.path) if item.is_dir else [item.path]
        return out

    files = set(listing())
    for name in (
        "learning_curves.png",
        "confusion_matrix.png",
        "classification_report.txt",
        "classification_report.json",
        "augmented_views.png",
        "misclassified.png",
    ):
        assert f"evaluation/{name}" in files
    assert {"config/config.yaml", "config/overrides.yaml", "data/classes.json"} <= files
    classes = client.download_artifacts(run.info.run_id, "data/classes.json")
    import json

    data = json.loads(Path(classes).read_text())
    assert data["class_names"] == ["class_0", "class_1", "class_2"]
    assert sum(data["counts"]["train"].values()) == 36


@pytest.mark.backends
def test_logged_model_takes_uint8_images_and_predicts_like_the_trained_one(tiny_run, image_folder):
    import mlflow

    root, _, run = tiny_run
    client_for(root)
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    images = np.random.default_rng(1).integers(
        0, 256, (5, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8
    )
    in_memory = mlflow.keras.load_model(f"runs:/{run.info.run_id}/model")
    # Stored once: in MLflow, not also as a copy in the run's output folder; its size is the
    # logged Keras file's.
    assert not list(Path(run.data.tags["hydra_output_dir"]).rglob("*.keras"))
    logged = Path(mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/model"))
    size = (logged / "data" / "model.keras").stat().st_size / 1e6
    assert run.data.metrics["model_size_mb"] == pytest.approx(size, rel=1e-9)
    # The pyfunc answers in the run's class names, with the Keras model's probabilities.
    served = pyfunc.predict(images)
    expected = in_memory.predict(images, verbose=0)
    names = ["class_0", "class_1", "class_2"]
    probabilities = [[row[name] for name in names] for row in served["probabilities"]]
    np.testing.assert_allclose(probabilities, expected, rtol=1e-5, atol=1e-6)
    assert list(served["class"]) == [names[i] for i in expected.argmax(axis=1)]
    np.testing.assert_allclose(served["confidence"], expected.max(axis=1), rtol=1e-5)
    assert pyfunc.metadata.get_input_schema().inputs[0].type == np.dtype(np.uint8)


@pytest.mark.backends
def test_logged_model_pins_keras_numpy_and_its_backend(tiny_run):
    from importlib.metadata import version

    import keras
    import mlflow

    root, _, run = tiny_run
    client_for(root)
    folder = mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/model")
    pins = set((Path(folder) / "requirements.txt").read_text().split())
    backend = keras.backend.backend()
    expected = {"keras", "numpy", backend} | ({"jaxlib"} if backend == "jax" else set())
    assert pins == {f"{name}=={version(name)}" for name in expected} | {
        f"mlflow=={version('mlflow')}"
    }


@pytest.mark.backends
def test_evaluate_logs_a_linked_run(tiny_run, image_folder):
    from experiments.evaluate import evaluate

    root, _, run = tiny_run
    cfg = compose_config_evaluate(root, f"runs:/{run.info.run_id}/model")
    accuracy = evaluate(cfg)
    (evaluation,) = runs_of(root, "folder", "tags.run_type = 'evaluate'")
    assert evaluation.data.tags["source_run_id"] == run.info.run_id
    assert evaluation.data.metrics["test_accuracy"] == pytest.approx(accuracy)
    assert accuracy == pytest.approx(run.data.metrics["test_accuracy"])


def compose_config_evaluate(root, model):
    from hydra import compose, initialize_config_dir

    from experiments import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(
            config_name="evaluate", overrides=[f"paths.root_dir={root}", f"model={model}"]
        )


def test_compare_prints_and_saves_the_table(tiny_run, capsys):
    from experiments.compare import main

    root, _, run = tiny_run
    code = main(
        [
            "folder",
            "--tracking-uri",
            f"sqlite:///{root}/mlruns/mlflow.db",
            "--out",
            str(root / "reports"),
            "--filter",
            "tags.backbone = 'vgg16'",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "folder-vgg16-inline-reference" in printed and "time_per_epoch_s" in printed
    import pandas as pd

    table = pd.read_csv(root / "reports" / "comparison-folder.csv")
    assert len(table) == 1  # the evaluation run is not a training row
    assert table.loc[0, "test_accuracy"] == pytest.approx(run.data.metrics["test_accuracy"])
    assert table.loc[0, "epochs"] == 3
    assert (root / "reports" / "comparison-folder.png").stat().st_size > 1000
    assert "| task" in (root / "reports" / "comparison-folder.md").read_text()
    assert (
        main(
            [
                "folder",
                "--tracking-uri",
                f"sqlite:///{root}/mlruns/mlflow.db",
                "--filter",
                "tags.backbone = 'none'",
            ]
        )
        == 2
    )


@pytest.mark.parametrize(
    ("error", "status"), [(RuntimeError, "FAILED"), (KeyboardInterrupt, "KILLED")]
)
def test_interrupted_runs_end_failed_or_killed(error, status, make_config, tmp_path, monkeypatch):
    def explode(ctx):
        import mlflow

        mlflow.log_metric("before_the_crash", 1.0)
        raise error("boom")

    monkeypatch.setattr(strategies, "STRATEGIES", {"inline": explode})
    with pytest.raises(error):
        train(make_config())
    (run,) = runs_of(tmp_path, "folder")
    assert run.info.status == status
    assert run.data.metrics["before_the_crash"] == 1.0  # what was logged is kept


def test_params_are_logged_in_batches_within_mlflow_limits(tmp_path):
    from omegaconf import OmegaConf

    from experiments import tracking
    from experiments.tracking import log_config

    store = OmegaConf.create(
        {
            "uri": f"sqlite:///{tmp_path}/mlflow.db",
            "experiment": "params",
            "outbox_dir": str(tmp_path / "outbox"),
        }
    )
    cfg = OmegaConf.create({"many": {f"k{i}": i for i in range(250)}, "long": "x" * 9000})
    with tracking.start_run(store, "params", {}) as run:
        log_config(cfg, ["a=1"])
    params = tracking.find_run(run.run_id).params
    assert len(params) == 251 and len(params["long"]) == 6000


def test_multirun_nests_jobs_under_one_parent(tmp_path, image_folder):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.train",
            "-m",
            *tiny_overrides(tmp_path, image_folder),
            "trainer.epochs=1",
            "trainer.seed=1,2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = runs_of(tmp_path, "folder")
    parents = [r for r in runs if r.data.tags.get("sweep") == "true"]
    assert len(parents) == 1
    (parent,) = parents
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and len(runs) == 3
    assert parent.info.status == "FINISHED" and parent.data.tags["jobs"] == "2"
    assert "trainer.seed=1,2" in parent.data.tags["sweep_overrides"]
    assert (tmp_path / "multirun").is_dir()
    # Each run's name says what tells it from its siblings; the parent's, what it is.
    assert sorted(c.info.run_name for c in children) == ["trial-0 seed=1", "trial-1 seed=2"]
    assert parent.info.run_name.startswith("sweep ") and parent.info.run_name.endswith(": seed")
    assert parent.data.tags["swept_params"] == "trainer.seed"
    assert "**Best**: trial-" in parent.data.tags["mlflow.note.content"]


def test_a_swept_value_is_named_short():
    from experiments.sweeps.trial import short_value

    assert [short_value(v) for v in (3e-4, 0.25, 1e-5, 12345.0, [256, 128], "vgg16")] == [
        "3e-4", "0.25", "1e-5", "1.2e4", "[256,128]", "vgg16"
    ]  # fmt: skip


def test_the_swept_keys_are_the_sweep_overrides_and_the_search_space_less_fixed_ones():
    from experiments.core.job import sweep_keys

    space = {"optimizer.lr": "interval(1e-5, 1e-2)", "head.dropout": "interval(0, 0.5)"}
    overrides = ["optimizer.lr=3e-3", "backbone=vgg16,resnet50", "trainer.epochs=2"]
    assert sweep_keys(overrides, space) == ["backbone", "head.dropout"]
    assert sweep_keys(["trainer.seed=range(3)", "hydra.sweeper.n_trials=3"], None) == [
        "trainer.seed"
    ]


def test_system_metrics_are_sampled_or_turned_off(make_config, tmp_path):
    """MLflow's system metrics, one point per sample and one at the end, or none at all."""
    train(make_config("trainer.epochs=1", "tracking.system_metrics_interval_s=0.2"))
    train(make_config("trainer.epochs=1", "tracking.system_metrics=false", "trainer.seed=3"))
    sampled, off = runs_of(tmp_path, "folder")
    assert "system/cpu_utilization_percentage" in sampled.data.metrics
    assert "system/system_memory_usage_megabytes" in sampled.data.metrics
    assert not [k for k in off.data.metrics if k.startswith("system/")]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1 with its own sqlite file, stopped at the end."""
    server = MlflowServer(tmp_path).start()
    yield server.url
    server.stop()


def test_runs_go_to_a_tracking_server(mlflow_server, make_config):
    import mlflow
    from mlflow.tracking import MlflowClient

    train(make_config(f"tracking.uri={mlflow_server}", "trainer.epochs=1"))
    mlflow.set_tracking_uri(mlflow_server)
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("folder").experiment_id])
    assert run.info.status == "FINISHED"
    assert "test_accuracy" in run.data.metrics
    assert len(client.get_metric_history(run.info.run_id, "val_accuracy")) == 1
    paths = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert "evaluation/confusion_matrix.png" in paths


def test_processes_opening_one_new_store_together_all_succeed(tmp_path):
    """A sweep shared by several processes: each creates the same new sqlite store at once."""
    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    code = (
        "from omegaconf import OmegaConf\n"
        "from experiments.tracking import set_tracking\n"
        f"cfg = OmegaConf.create({{'uri': {uri!r}, 'experiment': 'shared', "
        f"'artifact_dir': {str(tmp_path / 'artifacts')!r}}})\n"
        "print(set_tracking(cfg))\n"
    )
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    results = [(p.wait(timeout=300), *p.communicate()) for p in processes]
    assert all(code == 0 for code, _, _ in results), [err[-2000:] for _, _, err in results]
    assert len({out.strip().splitlines()[-1] for _, out, _ in results}) == 1  # one experiment


@pytest.mark.slow
def test_evaluate_runs_as_the_readme_writes_it(tmp_path):
    """`python -m experiments.evaluate model=runs:/<id>/model split=test`: the task comes from
    the source run and the image size from the model (48 px here, the digits file says 32)."""
    overrides = [
        f"paths.root_dir={tmp_path}",
        "task=digits",
        "task.image_size=[48,48]",
        "backbone=vgg16",
        "backbone.weights=null",
        "strategy=two_stage",
        "augmentation=none",
        "head.units=[32]",
        "trainer.epochs=2",
        "trainer.batch_size=64",
    ]
    train(compose_config(overrides))
    (run,) = runs_of(tmp_path, "digits")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.evaluate",
            f"model=runs:/{run.info.run_id}/model",
            "split=test",
            f"paths.root_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    evaluations = runs_of(tmp_path, "digits", "tags.run_type = 'evaluate'")
    assert len(evaluations) == 1
    for evaluation in evaluations:
        assert evaluation.data.tags["source_run_id"] == run.info.run_id
        assert evaluation.data.metrics["test_accuracy"] == pytest.approx(
            run.data.metrics["test_accuracy"]
        )


def test_artifacts_follow_an_sqlite_store_elsewhere(make_config, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    train(make_config(f"tracking.uri=sqlite:///{elsewhere}/mlflow.db", "trainer.epochs=1"))
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{elsewhere}/mlflow.db")
    (run,) = MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name("folder").experiment_id]
    )
    assert run.info.artifact_uri.startswith((elsewhere / "artifacts").as_uri())
    assert any((elsewhere / "artifacts").rglob("MLmodel"))  # the model, beside its store
    assert not (tmp_path / "mlruns").exists()
    assert not list((tmp_path / "outputs").rglob("*.keras"))  # and stored once


@pytest.mark.slow
def test_no_command_writes_outside_its_paths(tmp_path, image_folder):
    """Train, a multirun, evaluate, runs and compare, launched from another folder, write only
    under paths.* (MLflow's default store would be an mlflow.db in the working directory)."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    root = tmp_path / "root"
    overrides = [*tiny_overrides(root, image_folder), "trainer.epochs=1"]

    def run(*args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    run("experiments.train", *overrides)
    run("experiments.train", "-m", *overrides, "trainer.seed=1,2")
    (first, *_) = runs_of(root, "folder")
    run(
        "experiments.evaluate",
        f"model=runs:/{first.info.run_id}/model",
        f"paths.root_dir={root}",
    )
    run("experiments.runs", f"paths.root_dir={root}")
    store = f"sqlite:///{root}/mlruns/mlflow.db"
    run("experiments.compare", "--tracking-uri", store, "--out", str(root / "reports"))
    assert sorted(p.name for p in cwd.iterdir()) == []
    assert {p.name for p in root.iterdir()} <= {
        "mlruns",
        "outputs",
        "multirun",
        "cache",
        "checkpoints",
        "reports",
        "keras",
        "outbox",
    }
