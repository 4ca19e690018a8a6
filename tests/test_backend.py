"""Backends: chosen before Keras is imported; a JAX run needs no TensorFlow."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import tiny_overrides
from helpers import env_without, runs_of


def test_a_process_keeps_the_backend_keras_was_imported_with():
    import keras

    from experiments.backend import use_backend
    from experiments.errors import ExperimentError

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
