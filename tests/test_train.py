"""Training end to end, in process, on generated images: strategies, heads and the cache."""

from __future__ import annotations

import numpy as np
import pytest

from experiments import tracking
from experiments.pipeline.run import train

from conftest import IMAGE_SIZE
from helpers import client_for, runs_of


@pytest.mark.backends
@pytest.mark.parametrize("strategy", ["inline", "two_stage", "fine_tune"])
def test_each_strategy_beats_chance(strategy, make_config, tmp_path):
    cfg = make_config(
        f"strategy={strategy}", *(["strategy.epochs=2"] if strategy == "fine_tune" else [])
    )
    value = train(cfg)
    (run,) = runs_of(tmp_path, "folder")
    metrics = run.data.metrics
    assert run.info.status == "FINISHED"
    assert metrics["test_accuracy"] >= 0.8, metrics  # chance is 1/3
    assert value == pytest.approx(metrics["best_val_accuracy"])
    epochs = 5 if strategy == "fine_tune" else 3
    history = client_for(tmp_path).get_metric_history(run.info.run_id, "val_accuracy")
    assert [m.step for m in history] == list(range(epochs))
    assert run.data.tags["strategy"] == strategy


@pytest.mark.backends
def test_fine_tune_unfreezes_top_blocks_but_not_batchnorm(make_config):
    import keras

    from experiments.model.backbones import build_backbone, unfreeze_top_blocks

    cfg = make_config("backbone=resnet50")
    base, _ = build_backbone(cfg.backbone, (32, 32, 3), None)
    names = unfreeze_top_blocks(base, list(cfg.backbone.blocks), 1)
    assert names and all(n.startswith("conv5_") for n in names)
    trainable = [layer for layer in base.layers if layer.trainable and layer.weights]
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in trainable)
    assert {layer.name for layer in trainable} == set(names)


@pytest.mark.backends
def test_two_stage_reuses_cached_features(make_config, tmp_path, caplog):
    train(make_config("strategy=two_stage"))
    files = list((tmp_path / "cache" / "features").glob("*/train.npy"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    assert "not applied" not in caplog.text

    # Augmentation is not part of the key: two-stage features are never augmented, and it says so.
    train(make_config("strategy=two_stage", "head.units=[16]", "augmentation=reference"))
    assert "augmentation=reference is not applied" in caplog.text
    first, second = runs_of(tmp_path, "folder")
    assert first.data.tags["feature_cache"] == "miss"
    assert second.data.tags["feature_cache"] == "hit"
    assert second.data.tags["augmentation"] == "reference"
    assert second.data.tags["augmentation_applied"] == "false"
    assert files[0].stat().st_mtime_ns == mtime
    assert len(list((tmp_path / "cache" / "features").iterdir())) == 1


@pytest.mark.backends
def test_two_stage_evaluates_from_cached_features(make_config, tmp_path, monkeypatch):
    """With the features cached, the base never runs again: not for training, not for the test
    and validation splits; the recorded test accuracy is what the saved base + head scores on
    the images."""
    import keras

    from experiments.data.tasks import load_task
    from experiments.evaluation.reports import evaluate_split

    train(make_config("strategy=two_stage"))  # extracts the features
    shapes = []
    original = keras.Model.predict

    def spy(self, x, *args, **kwargs):
        shapes.append(tuple(self.input_shape[1:]))
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "predict", spy)
    cfg = make_config(
        "strategy=two_stage",
        "head.units=[16]",
        "tracking.log_model=true",
        "evaluation.temperature_scaling=true",  # evaluates the validation split too
    )
    train(cfg)
    image_shape = (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert shapes and image_shape not in shapes  # only the head on features, test and val
    monkeypatch.setattr(keras.Model, "predict", original)
    _, second = runs_of(tmp_path, "folder")
    model = tracking.load_model(f"runs:/{second.info.run_id}/model")
    test = load_task(cfg.task, cfg.paths).splits["test"]
    on_images = evaluate_split(model, test, 3)
    assert second.data.metrics["test_accuracy"] == on_images.accuracy
    assert second.data.metrics["test_loss"] == pytest.approx(on_images.loss, rel=1e-4)


@pytest.mark.backends
def test_a_run_records_where_its_time_went(make_config, tmp_path, caplog):
    import logging

    import keras

    from experiments.core.phases import PHASES

    with caplog.at_level(logging.INFO, logger="experiments.train"):
        train(make_config("trainer.epochs=3"))
    (run,) = runs_of(tmp_path, "folder")
    metrics = run.data.metrics
    seconds = [metrics[f"time_{p}_s"] for p in PHASES]
    assert all(s >= 0 for s in seconds)
    assert metrics["time_total_s"] == pytest.approx(sum(seconds), abs=0.01)
    assert metrics["time_train_s"] > 0 and metrics["time_evaluate_s"] > 0
    assert metrics["time_compile_s"] > 0  # the first epoch compiles: it is the slowest
    assert metrics["peak_anon_mb"] > 100  # what the run held itself, sampled (Keras alone: more)
    jax = keras.backend.backend() == "jax"  # JAX counts its compiles; elsewhere an estimate
    assert run.data.tags["time_compile_source"] == ("measured" if jax else "estimated")
    run_s = metrics["time_total_s"] - metrics["time_startup_s"]
    assert metrics["train_fraction"] == pytest.approx(metrics["time_train_s"] / run_s, abs=1e-3)
    last = [r.getMessage() for r in caplog.records if r.name == "experiments.train"][-1]
    assert last.startswith(f"run {run.info.run_id}: time ")
    assert all(word in last for word in ("start-up", "compiling", "training", "evaluating"))


@pytest.mark.backends
def test_one_epoch_never_records_a_compile_time_of_zero(make_config, tmp_path, caplog):
    """With one epoch there are no other epochs to compare the first with: JAX's compile events
    still measure it; elsewhere it is left unrecorded and the log line says so."""
    import logging

    import keras

    with caplog.at_level(logging.INFO, logger="experiments.train"):
        train(make_config("trainer.epochs=1"))
    (run,) = runs_of(tmp_path, "folder")
    last = [r.getMessage() for r in caplog.records if r.name == "experiments.train"][-1]
    if keras.backend.backend() == "jax":
        assert run.data.metrics["time_compile_s"] > 0
        assert run.data.tags["time_compile_source"] == "measured"
    else:
        assert "time_compile_s" not in run.data.metrics
        assert "time_compile_source" not in run.data.tags
        assert "compiling unknown" in last
    assert run.data.metrics["time_train_s"] > 0


def test_phases_split_the_compile_time_as_they_learn_it():
    from experiments.core.phases import Phases

    measured = Phases()
    measured.add("train", 10.0)
    measured.split_compile([[6.0]], measured=2.5)  # one epoch, but JAX counted 2.5 s
    assert (measured.seconds["compile"], measured.seconds["train"]) == (2.5, 7.5)
    estimated = Phases()
    estimated.add("train", 10.0)
    estimated.split_compile([[5.0, 2.0, 3.0], [1.0]])  # 5 - 3, the upper median of the rest
    assert estimated.compile_source == "estimated" and estimated.seconds["compile"] == 2.0
    unknown = Phases()
    unknown.add("train", 10.0)
    unknown.split_compile([[6.0], [4.0]])
    assert unknown.compile_source is None and "time_compile_s" not in unknown.metrics()
    assert unknown.seconds["train"] == 10.0 and "compiling unknown" in unknown.line()


@pytest.mark.parametrize(("classes", "outputs"), [(2, 1), (3, 3)])
def test_head_follows_the_class_count(
    classes, outputs, make_config, binary_folder, image_folder, tmp_path
):
    import mlflow

    folder = binary_folder if classes == 2 else image_folder
    train(make_config(folder=folder))
    (run,) = runs_of(tmp_path, "folder")
    assert run.data.metrics["test_accuracy"] >= 0.8
    model = mlflow.keras.load_model(f"runs:/{run.info.run_id}/model")
    assert model.output_shape == (None, outputs)
    assert model.get_layer("head").layers[-1].activation.__name__ == (
        "sigmoid" if classes == 2 else "softmax"
    )
    assert model.loss == (
        "binary_crossentropy" if classes == 2 else "sparse_categorical_crossentropy"
    )
    probabilities = model.predict(np.zeros((2, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8), verbose=0)
    assert ((probabilities >= 0) & (probabilities <= 1)).all()


def test_balanced_class_weights_follow_the_train_split(make_config, tmp_path):
    from experiments.data.splits import Split, Task
    from experiments.training.strategies import class_weights

    labels = np.array([0] * 6 + [1] * 2)
    split = Split(np.zeros((8, 2, 2, 3), np.uint8), labels, [str(i) for i in range(8)])
    task = Task("t", ["a", "b"], {"train": split, "val": split, "test": split})
    assert class_weights("balanced", task) == pytest.approx({0: 8 / 12, 1: 8 / 4})
    assert class_weights("none", task) is None


def test_jobs_in_one_process_release_earlier_graphs(make_config):
    """A sweep's trials share a process: a job's traced graphs and variables die with the next."""
    import gc

    from tensorflow.python.framework.func_graph import FuncGraph

    def live_graphs() -> int:
        gc.collect()
        return sum(isinstance(o, FuncGraph) for o in gc.get_objects())

    train(make_config("tracking.log_model=false"))
    after_one = live_graphs()
    assert after_one > 0  # the last job's own train step, kept until the next job starts
    train(make_config("head.units=[16]", "tracking.log_model=false"))
    train(make_config("head.units=[8]", "tracking.log_model=false"))
    assert live_graphs() == after_one


def test_a_later_job_still_collects_what_jobs_left_but_no_longer_walks_the_imports():
    """Each job collects the garbage earlier jobs left (reference cycles such as traced
    graphs); what the process imported is set aside once, so that collecting stays short."""
    import gc
    import weakref

    from experiments.pipeline.run import release_earlier_jobs

    class Node:
        pass

    release_earlier_jobs()
    assert gc.get_freeze_count() > 0  # the imports: no later collection walks them
    gc.disable()  # only release_earlier_jobs may collect now
    try:
        first, second = Node(), Node()
        first.other, second.other = second, first  # a cycle: only a collection frees it
        left = weakref.ref(first)
        del first, second
        assert left() is not None
        release_earlier_jobs()
        assert left() is None
    finally:
        gc.enable()


@pytest.mark.backends
def test_a_backup_restores_the_optimizer_state_and_the_epoch(tmp_path):
    """Keras' BackupAndRestore (our atomic subclass): a second fit resumes where the first
    stopped, with the optimizer's step count and moments, not a fresh optimizer."""
    import keras

    from experiments.training.checkpoints import RunCheckpoints

    x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("float32")

    def model():
        keras.utils.set_random_seed(0)
        m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="sigmoid")])
        m.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy")
        return m

    state = RunCheckpoints(tmp_path / "run")

    class Stop(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise RuntimeError("killed after epoch 2")

    first = model()
    with pytest.raises(RuntimeError):
        first.fit(
            x, y, batch_size=8, epochs=5, verbose=0, callbacks=[state.backup("head", 0), Stop()]
        )
    assert state.completed_epochs() == 2
    second = model()
    history = second.fit(
        x, y, batch_size=8, epochs=5, verbose=0, callbacks=[state.backup("head", 0)]
    )
    assert len(history.history["loss"]) == 3  # epochs 3-5 only
    assert int(second.optimizer.iterations.numpy()) == 5 * 4  # 2 restored epochs + 3, 4 steps each
    assert [r["epoch"] for r in state.records()] == [0, 1, 2, 3, 4]
    assert not list((tmp_path / "run").rglob(".*"))  # no temporary file left behind


def _base_and_head(seed: int):
    """A frozen 'base' layer under a trained head, its initial weights drawn from `seed`."""
    import keras

    keras.utils.set_random_seed(seed)
    base = keras.layers.Dense(8, activation="relu", name="base")
    base.trainable = False
    model = keras.Sequential(
        [keras.Input((4,)), base, keras.layers.Dense(1, activation="sigmoid", name="head")]
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy")
    return model


@pytest.mark.backends
def test_epoch_backups_leave_the_frozen_base_out_and_a_resume_restores_it(tmp_path):
    """Every epoch writes only what training changes; the frozen base is written once as the
    phase begins, and a resumed run takes it from there, not from its own fresh build."""
    import h5py
    import keras

    from experiments.training.checkpoints import RunCheckpoints, frozen_layers

    x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("float32")
    state = RunCheckpoints(tmp_path / "run")

    class Stop(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise RuntimeError("killed after epoch 2")

    first = _base_and_head(0)
    assert [layer.name for layer in frozen_layers(first)] == ["base"]
    callbacks = [state.backup("head", 0), state.best_checkpoint("head", "loss")]
    with pytest.raises(RuntimeError):
        first.fit(x, y, batch_size=8, epochs=5, verbose=0, callbacks=[*callbacks, Stop()])
    phase = tmp_path / "run" / "backup" / "head"
    # Keras names a file's layer groups by class and order: the base and the head are two.
    for name, layers in (("latest", 1), ("best", 1), ("start", 2)):
        with h5py.File(phase / f"{name}.weights.h5") as saved:
            assert len(saved["layers"]) == layers, (name, list(saved["layers"]))

    second = _base_and_head(1)  # another draw of the base: only the start file can restore it
    assert not np.allclose(second.get_layer("base").kernel, first.get_layer("base").kernel)
    callbacks = [state.backup("head", 0), state.best_checkpoint("head", "loss")]
    second.fit(x, y, batch_size=8, epochs=5, verbose=0, callbacks=callbacks)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(second.get_layer("base").kernel),
        keras.ops.convert_to_numpy(first.get_layer("base").kernel),
    )
    assert int(second.optimizer.iterations.numpy()) == 5 * 4  # the trained part resumed too


@pytest.mark.backends
@pytest.mark.parametrize("second_phase_improves", [True, False])
def test_the_best_epoch_is_restored_across_phases(second_phase_improves, tmp_path):
    """Fine-tuning unfreezes the base, so each phase leaves out other layers: the weights
    restored at the end are those of the best epoch of either phase, whole."""
    import keras

    from experiments.training.checkpoints import RunCheckpoints

    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    y = (x[:, 0] + x[:, 1] > 0).astype("float32")
    state = RunCheckpoints(tmp_path / "run")
    model = _base_and_head(0)

    class Snapshots(keras.callbacks.Callback):
        """Each epoch's weights and loss."""

        def __init__(self):
            super().__init__()
            self.taken: list[tuple[float, list]] = []

        def on_epoch_end(self, epoch, logs=None):
            self.taken.append((logs["val_loss"], [np.array(w) for w in self.model.get_weights()]))

    snapshots = Snapshots()

    def fit(phase, epochs, initial_epoch=0):
        callbacks = [state.backup(phase, initial_epoch), state.best_checkpoint(phase, "val_loss")]
        model.fit(
            x,
            y,
            validation_data=(x, y),
            batch_size=8,
            epochs=epochs,
            verbose=0,
            initial_epoch=initial_epoch,
            callbacks=[*callbacks, snapshots],
        )
        state.restore_best(phase, model)

    fit("head", 3)
    model.get_layer("base").trainable = True
    rate = 1e-2 if second_phase_improves else 50.0  # 50 only makes it worse
    model.compile(optimizer=keras.optimizers.Adam(rate), loss="binary_crossentropy")
    fit("fine_tune", 6, initial_epoch=3)

    losses = [loss for loss, _ in snapshots.taken]
    best = int(np.argmin(losses))
    assert (best >= 3) == second_phase_improves, losses
    for restored, expected in zip(model.get_weights(), snapshots.taken[best][1], strict=True):
        np.testing.assert_allclose(np.array(restored), expected, rtol=0, atol=0)


def test_a_run_checkpointed_whole_before_still_restores_its_best(tmp_path):
    """A run killed before epoch files left the frozen layers out kept one whole best file at
    its root: resumed now, its best epoch is still what it ends with."""
    from experiments.training.checkpoints import RunCheckpoints

    state = RunCheckpoints(tmp_path / "run")
    model = _base_and_head(0)
    state.root.mkdir(parents=True)
    model.save_weights(state.root / "best.weights.h5")
    best = [np.array(w) for w in model.get_weights()]
    model.set_weights([w + 1 for w in best])
    state.restore_best("head", model)
    for restored, expected in zip(model.get_weights(), best, strict=True):
        np.testing.assert_array_equal(np.array(restored), expected)


@pytest.mark.backends
def test_fit_callbacks_leave_training_steps_asynchronous(make_config, monkeypatch):
    """A callback with a batch-end hook makes Keras wait for every step's logs (no asynchronous
    dispatch): the device idles between steps. Every callback a run fits with has none, or is
    marked `async_safe`."""
    import keras

    fits = []
    original = keras.Model.fit

    def spy(self, *args, callbacks=None, **kwargs):
        fits.append(list(callbacks or []))
        return original(self, *args, callbacks=callbacks, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", spy)
    train(
        make_config(
            "trainer.epochs=1",
            "trainer.early_stopping.enabled=true",
            "trainer.reduce_lr.enabled=true",
        )
    )
    base = keras.callbacks.Callback
    assert fits
    for callbacks in fits:
        assert any(type(c).__name__ == "StopOnSignal" for c in callbacks)
        for callback in callbacks:
            if getattr(callback, "async_safe", False):
                continue
            for hook in ("on_batch_end", "on_train_batch_end", "on_test_batch_end"):
                assert getattr(type(callback), hook) is getattr(base, hook), (
                    f"{type(callback).__name__}.{hook}"
                )


@pytest.mark.backends
def test_several_steps_per_compiled_call_train_every_epoch(make_config, tmp_path, monkeypatch):
    """trainer.steps_per_execution runs several train steps per compiled call (auto: 16 on a GPU,
    1 on a CPU); every epoch is still trained, backed up and logged."""
    import keras

    from experiments.training.compiling import steps_per_execution

    assert steps_per_execution("auto") == 1  # CI has no GPU
    seen = []
    original = keras.Model.compile

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("steps_per_execution"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "compile", spy)
    train(make_config("trainer.epochs=3", "trainer.steps_per_execution=3"))
    assert 3 in seen
    (run,) = runs_of(tmp_path, "folder")
    client = client_for(tmp_path)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [0, 1, 2]
    assert run.data.metrics["epochs_run"] == 3


def test_the_saved_models_score_is_the_one_recorded_and_returned(make_config, tmp_path):
    """trainer.restore_best=false keeps the last epoch's weights: the recorded selection value,
    saved_val_accuracy, is the last epoch's val_accuracy and the value a sweep trial returns,
    whatever a better epoch scored (best_val_accuracy keeps that). The run keeps every test
    image's prediction, with the test split's digest, and the test accuracy's Wilson interval."""
    import csv
    import json

    from scipy import stats

    from experiments.data.tasks import load_task

    cfg = make_config("trainer.restore_best=false", "trainer.epochs=3")
    value = train(cfg)
    (run,) = runs_of(tmp_path, "folder")
    metrics, client = run.data.metrics, client_for(tmp_path)
    history = [m.value for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
    assert len(history) == 3 and metrics["saved_epoch"] == 3
    assert metrics["saved_val_accuracy"] == pytest.approx(history[-1])
    assert metrics["best_val_accuracy"] == pytest.approx(max(history))
    assert value == pytest.approx(history[-1])  # what a sweeper gets: the saved model's
    assert float(run.data.tags["returned_value"]) == pytest.approx(history[-1])
    val_loss = [m.value for m in client.get_metric_history(run.info.run_id, "val_loss")]
    assert metrics["saved_val_loss"] == pytest.approx(val_loss[-1])

    folder = tmp_path / "predictions"
    for name in ("predictions_test.csv", "predictions_test.json"):
        client.download_artifacts(run.info.run_id, f"evaluation/{name}", str(folder))
    rows = list(csv.DictReader((folder / "predictions_test.csv").open()))
    meta = json.loads((folder / "predictions_test.json").read_text())
    test = load_task(cfg.task, cfg.paths).splits["test"]
    assert meta["digest"] == test.digest() and meta["rows"] == len(rows) == len(test.labels)
    assert [r["source"] for r in rows] == test.sources
    assert [r["label"] for r in rows] == [meta["class_names"][i] for i in test.labels]
    right = sum(r["label"] == r["predicted"] for r in rows)
    assert right / len(rows) == pytest.approx(metrics["test_accuracy"])
    for r in rows:  # the class probabilities sum to 1 and the predicted class is the likeliest
        p = {c: float(r[f"p_{c}"]) for c in meta["class_names"]}
        assert sum(p.values()) == pytest.approx(1, abs=1e-4) and max(p, key=p.get) == r["predicted"]
    wilson = stats.binomtest(right, len(rows)).proportion_ci(method="wilson")
    assert metrics["test_accuracy_ci95_low"] == pytest.approx(wilson.low)
    assert metrics["test_accuracy_ci95_high"] == pytest.approx(wilson.high)


def test_the_saved_epoch_is_the_best_monitored_one_when_it_is_restored():
    from experiments.evaluation.summary import saved_epoch

    history = {"loss": [3, 2, 1, 1], "val_accuracy": [0.5, 0.9, 0.9, 0.7], "val_loss": [4, 1, 2, 3]}
    assert saved_epoch(history, True, "val_accuracy") == 1  # the first best: it is what is kept
    assert saved_epoch(history, True, "val_loss") == 1
    assert saved_epoch(history, False, "val_accuracy") == 3
    assert saved_epoch({}, True, "val_accuracy") == -1
