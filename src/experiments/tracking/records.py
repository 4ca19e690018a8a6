"""What a run records about itself: its config, where it ran, its data lineage and its model."""

from __future__ import annotations

import functools
import platform
import shlex
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from experiments.core.interrupts import uninterrupted
from experiments.tracking import tags as T
from experiments.tracking.client import unreachable
from experiments.tracking.runs import (
    active_run,
    log_artifact,
    log_datasets,
    log_metrics,
    log_params,
    log_text,
    logged_params,
    set_tags,
)


def flatten(node: Any, prefix: str = "") -> dict[str, str]:
    """Dotted keys to string values for every leaf of a nested dict or list."""
    if isinstance(node, dict) and node:
        out = {}
        for key, value in node.items():
            out |= flatten(value, f"{prefix}{key}.")
        return out
    return {prefix.rstrip("."): str(node)[: T.MAX_VALUE_CHARS]}


@uninterrupted
def log_config(cfg: DictConfig, overrides: list[str]) -> None:
    """Every resolved config leaf as a param, plus the config and overrides as YAML artifacts."""
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    # A resumed run keeps the params it has: MLflow refuses a new value (e.g. `resume`), and
    # where it writes may differ from the first command's.
    logged = logged_params(active_run().run_id)
    log_params({k: v for k, v in flatten(container).items() if k not in logged})
    log_text(OmegaConf.to_yaml(container), "config/config.yaml")
    # Last: a run resumed after a kill finds this file only if its config is whole.
    log_text(OmegaConf.to_yaml(list(overrides)), "config/overrides.yaml")


def run_tags(cfg: DictConfig, output_dir: str) -> dict[str, str]:
    """The tags that say what a run was and where it ran."""
    commit, dirty = git_state(cfg.paths.root_dir)
    tags = {
        T.TASK: cfg.task.name,
        T.BACKBONE: cfg.backbone.name,
        T.STRATEGY: cfg.strategy.name,
        T.AUGMENTATION: cfg.augmentation.name,
        "hydra_output_dir": output_dir,
        "python_version": platform.python_version(),
        # Quoted as a shell would take it back (runs prints it as a resume command).
        T.COMMAND: shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])[: T.MAX_VALUE_CHARS],
    }
    if commit:
        tags |= {"git_commit": commit, "mlflow.source.git.commit": commit, "git_dirty": str(dirty)}
    return tags


def git_state(root: str) -> tuple[str | None, bool]:
    """The checkout's commit and whether its tree has uncommitted changes."""
    try:
        commit = _git(root, "rev-parse", "HEAD").strip()
        dirty = bool(_git(root, "status", "--porcelain").strip())
    except (OSError, subprocess.SubprocessError):
        return None, False
    return commit, dirty


def _git(root: str, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", root, *args], capture_output=True, text=True, timeout=10, check=True
    ).stdout


@uninterrupted
def log_task(task) -> None:
    """Data lineage: an MLflow dataset input per split, class names and counts per class."""
    import mlflow.data
    import pandas as pd

    from experiments.data.splits import SPLITS

    # MLflow hints that integer columns cannot hold NaN: labels never do.
    warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")
    # MLflow 3.17 registers its local-file source class twice, and then warns that a source
    # "can be interpreted in multiple ways": both ways are the same class.
    warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
    datasets = {}
    for split in SPLITS:
        data = task.splits[split]
        frame = pd.DataFrame(
            {
                "source": data.sources,
                "label": data.labels,
                "class": [task.class_names[i] for i in data.labels],
            }
        )
        datasets[split] = mlflow.data.from_pandas(
            frame, source=task.name, name=f"{task.name}-{split}"
        )
    log_datasets(datasets)
    counts = task.counts()
    classes = {
        "class_names": task.class_names,
        "counts": counts,
        "skipped_files": task.skipped,
        "turned_files": task.turned,  # turned upright by their EXIF orientation
    }
    log_text(_json(classes), "data/classes.json")
    log_metrics({f"n_{s}": sum(counts[s].values()) for s in SPLITS})
    # Last: a run resumed after a kill finds this tag only if its lineage is whole.
    set_tags({T.CLASS_NAMES: ", ".join(task.class_names)})


def _json(value) -> str:
    import json

    return json.dumps(value, indent=2)


# The packages a logged model needs besides MLflow (which adds itself): per Keras backend, the
# import names whose installed distributions are pinned.
SERVING_MODULES = {
    "tensorflow": ("keras", "numpy", "tensorflow"),
    "jax": ("keras", "numpy", "jax", "jaxlib"),
    "torch": ("keras", "numpy", "torch"),
}


def serving_requirements(backend: str) -> list[str]:
    """Pinned pip requirements of a Keras model served on `backend`.

    Given these, MLflow skips inferring them, which loads the model again in a subprocess and
    costs ~10 s a run. They are what that inference finds: Keras, NumPy and the backend.
    """
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for module in SERVING_MODULES[backend]:
        try:  # the distribution is named as the module: the common case, and fast
            pins.append(f"{module}=={version(module)}")
        except PackageNotFoundError:  # e.g. tensorflow-cpu provides tensorflow
            for name in _distributions().get(module, [])[:1]:
                pins.append(f"{name}=={version(name)}")
    return pins


@functools.cache
def _distributions() -> dict[str, list[str]]:
    """Import names to the distributions that provide them (a scan of every installed
    distribution: about a second, so once a process)."""
    from importlib.metadata import packages_distributions

    return packages_distributions()


@uninterrupted
def log_model(model, image_shape, class_names: list[str]) -> float:
    """Log the Keras model with a uint8-image signature (no input example: mlflow#16183) and a
    pyfunc flavor that answers in `class_names` (`tracking.serving`); the size of its Keras file
    in MB.

    While the tracking server is lost the model is saved in MLflow's format into the outbox and
    sent later as the run's `model/` artifacts, which `runs:/<id>/model` loads the same way.
    """
    import tempfile

    import keras

    from experiments.tracking import serving
    from experiments.tracking.registry import logged_model_mb

    model_spec = {
        "keras_model": model,
        "class_names": class_names,
        "signature": serving.signature(image_shape),
        "pip_requirements": serving_requirements(keras.backend.backend()),
    }
    outbox = active_run().outbox
    if not outbox.is_down() and not outbox.pending():
        try:
            # A run resumed after a kill that came after its model was logged (the recording
            # that follows, its reports) keeps that model: the same best weights, logged once.
            if (size := logged_model_mb(active_run().run_id)) is not None:
                return size
            return serving.log_model(**model_spec) / 1e6
        except Exception as err:
            if not outbox.remote or not unreachable(err):
                raise
            outbox.went_down(err)
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "model"
        size = serving.save_model(saved, **model_spec)
        log_artifact(saved, "model")
    return size / 1e6
