"""The tracking group: MLflow runs with params, tags, data lineage, metrics, artifacts and models.

MLflow is imported inside the functions, so composing a config never pays for it.
"""

from __future__ import annotations

import atexit
import logging
import os
import platform
import socket
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from experiments.errors import ExperimentError

log = logging.getLogger(__name__)

# A multirun's parent run id, set by MlflowSweepCallback for the jobs it launches.
PARENT_RUN_ENV = "EXPERIMENTS_MLFLOW_PARENT_RUN_ID"
MAX_PARAMS_PER_CALL = 100
MAX_PARAM_CHARS = 6000
LOCAL_SCHEMES = ("sqlite:", "file:", "/")


def set_tracking(tracking) -> str:
    """Point MLflow at `tracking.uri` and return the id of `tracking.experiment`, creating it."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = str(tracking.uri)
    local = uri.startswith(LOCAL_SCHEMES)
    guard = nullcontext()
    if uri.startswith("sqlite:///"):
        from filelock import FileLock

        database = Path(uri[len("sqlite:///") :])
        database.parent.mkdir(parents=True, exist_ok=True)
        # MLflow creates and migrates a new sqlite store without a lock, so processes opening one
        # new store together (a sweep shared by several processes) race on its tables.
        guard = FileLock(f"{database}.lock")
    mlflow.set_tracking_uri(uri)
    with guard:
        return _experiment_id(MlflowClient(), tracking, uri, local)


def _experiment_id(client, tracking, uri: str, local: bool) -> str:
    from mlflow.exceptions import MlflowException

    name = str(tracking.experiment)
    try:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            location = Path(tracking.artifact_dir).resolve().as_uri() if local else None
            try:
                return client.create_experiment(name, artifact_location=location)
            except MlflowException:  # created meanwhile by a concurrent job
                experiment = client.get_experiment_by_name(name)
    except MlflowException as err:
        raise ExperimentError(
            f"cannot reach the MLflow store tracking.uri={uri} ({str(err).splitlines()[0]}); "
            f"start the server or fix tracking.uri / MLFLOW_TRACKING_URI"
        ) from None
    if experiment.lifecycle_stage == "deleted":
        raise ExperimentError(
            f"MLflow experiment {name!r} is deleted; restore it in the UI "
            f"(mlflow experiments restore) or set tracking.experiment to another name"
        )
    return experiment.experiment_id


@contextmanager
def start_run(tracking, run_name: str, tags: dict[str, str]) -> Iterator[Any]:
    """An active MLflow run that always ends: FINISHED, FAILED, or KILLED on Ctrl-C.

    A run stopped by an Optuna pruner ends FINISHED with the tag `pruned`, its curves kept.
    Inside a multirun the run nests under the sweep's parent run.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    experiment_id = set_tracking(tracking)
    parent = os.environ.get(PARENT_RUN_ENV) or None
    if parent:  # children live in their parent's experiment, or the UI cannot nest them
        experiment_id = MlflowClient().get_run(parent).info.experiment_id
    run = mlflow.start_run(
        experiment_id=experiment_id, run_name=run_name, parent_run_id=parent, tags=tags
    )
    try:
        yield run
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException as err:
        log_memory()
        if type(err).__name__ == "TrialPruned":
            mlflow.set_tag("pruned", "true")
            mlflow.end_run("FINISHED")
        else:
            mlflow.set_tag("error", f"{type(err).__name__}: {err}"[:MAX_PARAM_CHARS])
            mlflow.end_run("FAILED")
        raise
    else:
        log_memory()
        mlflow.end_run("FINISHED")


def log_memory() -> None:
    """The process's peak and current resident memory as the run ends, for every ending.

    Trials of a sweep share one process, so `peak_rss_mb` growing from trial to trial is a leak;
    `python -m experiments.benchmark` reads these.
    """
    import mlflow

    mlflow.log_metrics(memory_metrics())


def memory_metrics() -> dict[str, float]:
    """This process's peak resident memory so far and its current one, in MB."""
    import psutil

    rss = psutil.Process().memory_info().rss / 2**20
    try:
        import resource
    except ImportError:  # Windows: psutil reports the peak working set instead
        peak = getattr(psutil.Process().memory_info(), "peak_wset", 0) / 2**20
    else:
        # ru_maxrss is in kilobytes on Linux and in bytes on macOS.
        scale = 1 if sys.platform == "darwin" else 1024
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20
    return {"peak_rss_mb": peak, "rss_mb": rss}


def flatten(node: Any, prefix: str = "") -> dict[str, str]:
    """Dotted keys to string values for every leaf of a nested dict or list."""
    if isinstance(node, dict) and node:
        out = {}
        for key, value in node.items():
            out |= flatten(value, f"{prefix}{key}.")
        return out
    return {prefix.rstrip("."): str(node)[:MAX_PARAM_CHARS]}


def log_config(cfg: DictConfig, overrides: list[str]) -> None:
    """Every resolved config leaf as a param, plus the config and overrides as YAML artifacts."""
    import mlflow

    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    params = list(flatten(container).items())
    for start in range(0, len(params), MAX_PARAMS_PER_CALL):
        mlflow.log_params(dict(params[start : start + MAX_PARAMS_PER_CALL]))
    mlflow.log_text(OmegaConf.to_yaml(container), "config/config.yaml")
    mlflow.log_text(OmegaConf.to_yaml(list(overrides)), "config/overrides.yaml")


def run_tags(cfg: DictConfig, output_dir: str) -> dict[str, str]:
    """The tags that say what a run was and where it ran."""
    commit, dirty = git_state(cfg.paths.root_dir)
    tags = {
        "task": cfg.task.name,
        "backbone": cfg.backbone.name,
        "strategy": cfg.strategy.name,
        "augmentation": cfg.augmentation.name,
        "hydra_output_dir": output_dir,
        "python_version": platform.python_version(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:MAX_PARAM_CHARS],
    }
    if commit:
        tags |= {"git_commit": commit, "mlflow.source.git.commit": commit, "git_dirty": str(dirty)}
    return tags


def runtime_tags() -> dict[str, str]:
    """TensorFlow and Keras versions and the device: known only once TensorFlow is imported."""
    import keras
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        device = f"GPU: {details.get('device_name', gpus[0].name)} x{len(gpus)}"
    else:
        device = f"CPU: {cpu_name()} ({os.cpu_count()} cores)"
    return {
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
        "device": device,
        # Which trials of a sweep shared a process (memory), and where a launcher ran them.
        "host": socket.gethostname(),
        "pid": str(os.getpid()),
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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


def log_task(task) -> None:
    """Data lineage: an MLflow dataset input per split, class names and counts per class."""
    import mlflow
    import pandas as pd

    from experiments.tasks import SPLITS

    # MLflow hints that integer columns cannot hold NaN: labels never do.
    warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")
    for split in SPLITS:
        data = task.splits[split]
        frame = pd.DataFrame(
            {
                "source": data.sources,
                "label": data.labels,
                "class": [task.class_names[i] for i in data.labels],
            }
        )
        dataset = mlflow.data.from_pandas(frame, source=task.name, name=f"{task.name}-{split}")
        mlflow.log_input(dataset, context=split)
    counts = task.counts()
    mlflow.log_dict(
        {"class_names": task.class_names, "counts": counts, "skipped_files": task.skipped},
        "data/classes.json",
    )
    mlflow.set_tag("class_names", ", ".join(task.class_names)[:MAX_PARAM_CHARS])
    mlflow.log_metrics({f"n_{s}": sum(counts[s].values()) for s in SPLITS})


def log_model(model, image_shape, num_classes: int) -> None:
    """Log the Keras model with a uint8-image signature (no input example: mlflow#16183)."""
    import mlflow
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    outputs = 1 if num_classes == 2 else num_classes
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, *image_shape), "image")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, outputs), "probabilities")]),
    )
    mlflow.keras.log_model(model, name="model", signature=signature)


class MlflowSweepCallback(Callback):
    """Opens one MLflow parent run per multirun; every job of the sweep nests under it."""

    def __init__(self) -> None:
        self.run_id: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from mlflow.tracking import MlflowClient

        experiment_id = set_tracking(config.tracking)
        hydra_cfg = config.hydra
        overrides = list(hydra_cfg.overrides.task)
        sweeper = hydra_cfg.sweeper.get("_target_", "basic").rsplit(".", 1)[-1]
        run = MlflowClient().create_run(
            experiment_id,
            run_name=f"sweep-{Path(hydra_cfg.sweep.dir).name}",
            tags={
                "sweep": "true",
                "sweep_dir": str(hydra_cfg.sweep.dir),
                "sweep_overrides": " ".join(overrides)[:MAX_PARAM_CHARS],
                "sweeper": sweeper,
            },
        )
        self.run_id = run.info.run_id
        os.environ[PARENT_RUN_ENV] = self.run_id
        # A sweep that dies before on_multirun_end still closes its parent run.
        atexit.register(self.close, "FAILED")
        log.info("MLflow parent run %s for this sweep", self.run_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.close("FINISHED")

    def close(self, status: str) -> None:
        if self.run_id is None:
            return
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        children = client.search_runs(
            [client.get_run(self.run_id).info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{self.run_id}'",
        )
        client.set_tag(self.run_id, "jobs", str(len(children)))
        client.set_terminated(self.run_id, status)
        if status == "FINISHED" and not children:
            # Nothing ran (e.g. a complete study resumed): the run the study did run holds it all.
            client.delete_run(self.run_id)
            log.info("no job ran; deleted the empty parent run %s", self.run_id)
        os.environ.pop(PARENT_RUN_ENV, None)
        self.run_id = None
