"""Backends: chosen before Keras is imported; a JAX run needs no TensorFlow."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import tiny_overrides
from helpers import env_noting_import, env_without, runs_of


def test_a_process_keeps_the_backend_keras_was_imported_with():
    import keras

    from experiments.core.backend import use_backend
    from experiments.core.errors import ExperimentError

    current = keras.backend.backend()
    assert use_backend(current) == current
    other = "jax" if current != "jax" else "tensorflow"
    with pytest.raises(ExperimentError, match=f"already imported with the {current} backend"):
        use_backend(other)
    with pytest.raises(ExperimentError, match="backend=theano is unknown"):
        use_backend("theano")


def test_a_missing_backend_package_is_one_line(tmp_path, image_folder):
    result = subprocess.run(
        [sys.executable, "-m", "experiments.train", *tiny_overrides(tmp_path, image_folder)]
        + ["backend=torch"],
        capture_output=True,
        text=True,
        env=env_without(tmp_path, "torch"),
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert "backend=torch needs the torch package" in line and "pip install" in line
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "mlruns").exists()


@pytest.mark.slow
def test_a_jax_run_trains_logs_and_evaluates_without_tensorflow(tmp_path, image_folder):
    """Where TensorFlow is not installed: inline training with the reference augmentation, the
    model logged, then reloaded by `experiments.evaluate`, which scores it exactly as training
    did."""
    env = env_without(tmp_path, "tensorflow")
    env.pop("KERAS_BACKEND", None)
    overrides = [
        *tiny_overrides(tmp_path, image_folder),
        "backend=jax",
        "augmentation=reference",
        "trainer.epochs=1",
        "task.image_size=[48,48]",  # XLA's CPU convolutions crawl on VGG's 2x2 maps at 32 px
    ]

    def run(module, *args):
        result = subprocess.run(
            [sys.executable, "-m", module, *args], capture_output=True, text=True, env=env
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    run("experiments.train", *overrides)
    (trained,) = runs_of(tmp_path, "folder")
    assert trained.data.tags["backend"] == "jax"
    assert "tensorflow_version" not in trained.data.tags
    run(
        "experiments.evaluate",
        f"model=runs:/{trained.info.run_id}/model",
        f"paths.root_dir={tmp_path}",
        "backend=jax",
    )
    (evaluated,) = runs_of(tmp_path, "folder", "tags.run_type = 'evaluate'")
    assert evaluated.data.metrics["test_accuracy"] == trained.data.metrics["test_accuracy"]
    assert evaluated.data.metrics["test_loss"] == pytest.approx(
        trained.data.metrics["test_loss"], rel=1e-4
    )


@pytest.mark.slow
def test_a_jax_run_leaves_the_installed_tensorflow_unimported(tmp_path, image_folder):
    """TensorFlow is installed (a dependency), yet a JAX run, its model logged, never imports
    it: Keras would, to seed it and to serialize the model (2-4 s and its memory a process)."""
    assert importlib.util.find_spec("tensorflow") is not None
    env, noted = env_noting_import(tmp_path, "tensorflow")
    env.pop("KERAS_BACKEND", None)
    overrides = [
        *tiny_overrides(tmp_path, image_folder),
        "backend=jax",
        "trainer.epochs=1",
        "task.image_size=[48,48]",  # XLA's CPU convolutions crawl on VGG's 2x2 maps at 32 px
    ]
    result = subprocess.run(
        [sys.executable, "-m", "experiments.train", *overrides],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert not noted.exists(), noted.read_text()[-3000:]
    (trained,) = runs_of(tmp_path, "folder")
    assert trained.data.tags["backend"] == "jax"
    assert trained.data.metrics["model_size_mb"] > 0


@pytest.mark.slow
def test_compiled_steps_are_kept_on_disk_and_never_used_for_another_config(tmp_path, image_folder):
    """JAX's persistent compilation cache under paths.cache_dir: the same run again finds its
    compiled steps; another config misses; a corrupt entry is compiled again, and the run goes
    on."""
    overrides = [
        *tiny_overrides(tmp_path, image_folder),
        "backend=jax",
        "trainer.epochs=2",
        "task.image_size=[48,48]",  # XLA's CPU convolutions crawl on VGG's 2x2 maps at 32 px
        "resume=never",
    ]

    def run(*extra: str) -> dict[str, float]:
        result = subprocess.run(
            [sys.executable, "-m", "experiments.train", *overrides, *extra],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        newest = runs_of(tmp_path, "folder")[-1]
        return newest.data.metrics

    first = run()
    folder = next((tmp_path / "cache" / "compiled").glob("jax-*"))
    entries = sorted(folder.iterdir())
    assert entries and first["compile_cache_misses"] > 0 and first["compile_cache_hits"] == 0
    again = run()
    # Nothing is compiled again, not even the weight initializers' small programs.
    assert again["compile_cache_misses"] == 0
    assert again["compile_cache_hits"] == first["compile_cache_misses"] > 0
    other = run("head.units=[24]")  # another head: another train step, never the first's
    assert other["compile_cache_misses"] > 0
    for entry in entries:  # damaged on disk
        entry.write_bytes(b"not a compiled program")
    healed = run()
    assert healed["compile_cache_misses"] + healed["compile_cache_hits"] > 0
    assert healed["test_accuracy"] == first["test_accuracy"]


def test_parallel_jobs_each_take_a_gpu_of_their_own_and_memory_as_needed(tmp_path):
    """A sweep's n_jobs jobs run together: the i-th takes GPU i modulo the GPUs there are, set
    before the backend is imported, and allocates as it needs (no job grabs a whole GPU)."""
    script = (
        "import os, sys\n"
        "from experiments.core.devices import jobs_sharing_device, use_device_slot\n"
        "gpu = use_device_slot()\n"
        "print(gpu, repr(os.environ.get('CUDA_VISIBLE_DEVICES')),"
        " os.environ.get('XLA_PYTHON_CLIENT_PREALLOCATE'), 'jax' in sys.modules,"
        " jobs_sharing_device())\n"
    )

    def job(slot: str | None, visible: str) -> list[str]:
        env = {k: v for k, v in os.environ.items() if k != "XLA_PYTHON_CLIENT_PREALLOCATE"}
        env = env | {"CUDA_VISIBLE_DEVICES": visible}
        env.pop("EXPERIMENTS_DEVICE_SLOT", None)
        if slot:
            env["EXPERIMENTS_DEVICE_SLOT"] = slot
        result = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True
        )
        return result.stdout.split()

    # The last: how many jobs share the GPU (each keeps its part of the memory for its data).
    assert job("0/3", "4,6") == ["4", "'4'", "false", "False", "2"]  # jobs 0 and 2
    assert job("1/3", "4,6") == ["6", "'6'", "false", "False", "1"]
    assert job("2/3", "4,6") == ["4", "'4'", "false", "False", "2"]  # more jobs than GPUs: shared
    assert job("1/2", "") == ["None", "''", "false", "False", "1"]  # no GPU: memory settings only
    assert job(None, "4,6") == ["None", "'4,6'", "None", "False", "1"]  # alone: untouched


def test_a_tensorflow_fit_traces_its_train_step_once():
    """Built before `fit`, the optimizer and metrics are not created inside the first trace, so
    TensorFlow does not trace the step a second time."""
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "tensorflow":
        pytest.skip("the TensorFlow trainer's tracing")
    import numpy as np

    from experiments.data.inputs import batches
    from experiments.training.compiling import build_for_training

    rng = np.random.default_rng(0)
    x, y = rng.random((64, 8), np.float32), rng.integers(0, 3, 64)
    traces = []
    for built in (False, True):
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3, activation="softmax")])
        model.compile(
            optimizer="adam",
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
            jit_compile=False,
        )
        step, count = model.train_step, [0]

        def counted(data, step=step, count=count):
            count[0] += 1
            return step(data)

        model.train_step = counted
        train = batches(x, y, batch_size=16, shuffle=True)
        if built:
            build_for_training(model, train[0])
        model.fit(train, epochs=2, verbose=0)
        traces.append(count[0])
    assert traces == [2, 1]
