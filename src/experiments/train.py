"""Train one transfer-learning experiment: `python -m experiments.train [overrides]`.

Compose the config, load the task, build the backbone, train with the strategy, evaluate on the
test split and record everything in MLflow. Returns the value named by `optimized_metric`.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from experiments import config_dir
from experiments.errors import ExperimentError

log = logging.getLogger("experiments.train")

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter


def train(cfg: DictConfig) -> float:
    """Run the experiment `cfg` describes and return its `optimized_metric`."""
    from experiments import tracking
    from experiments.backbones import resolve_weights, weights_id
    from experiments.tasks import load_task

    # Data and weights first: a missing file stops the run before any model or MLflow run exists.
    task = load_task(cfg.task, cfg.paths)
    weights = resolve_weights(cfg.backbone, cfg.paths.weights_dir)

    import keras
    import mlflow

    from experiments.backbones import build_backbone
    from experiments.callbacks import EpochLogger
    from experiments.reports import evaluate_split, write_reports
    from experiments.strategies import Context, train_with_strategy
    from experiments.sweep import trial_callbacks, trial_tags

    release_earlier_jobs()
    keras.utils.set_random_seed(int(cfg.trainer.seed))
    workdir = output_dir(cfg.paths.output_dir, cfg.task.name)
    tags = tracking.run_tags(cfg, str(workdir)) | tracking.runtime_tags() | trial_tags(cfg)
    with tracking.start_run(cfg.tracking, str(cfg.tracking.run_name), tags) as run:
        tracking.log_config(cfg, task_overrides())
        tracking.log_task(task)
        base, preprocess = build_backbone(cfg.backbone, task.image_shape, weights)
        ctx = Context(
            cfg,
            task,
            base,
            preprocess,
            workdir,
            weights_id(weights),
            callbacks=[EpochLogger(len(task.splits["train"].labels)), *trial_callbacks(cfg)],
        )
        started = time.perf_counter()
        trained = train_with_strategy(ctx)
        train_time = time.perf_counter() - started

        test = evaluate_split(trained.model, task.splits["test"], task.num_classes)
        model_file = workdir / "model.keras"
        trained.model.save(model_file)
        metrics = summary_metrics(trained, test, train_time, model_file, len(task.skipped))
        mlflow.log_metrics(metrics)
        if trained.feature_cache:
            mlflow.set_tag("feature_cache", trained.feature_cache)
        augmentation = (
            trained.model.get_layer("augmentation")
            if any(layer.name == "augmentation" for layer in trained.model.layers)
            else None
        )
        # The `augmentation` tag is what was asked; two_stage trains without it.
        mlflow.set_tag("augmentation_applied", str(augmentation is not None).lower())
        reports = write_reports(
            workdir / "reports",
            test,
            task.splits["test"],
            task.class_names,
            trained.history,
            augmentation,
        )
        for path in reports:
            mlflow.log_artifact(str(path), artifact_path="evaluation")
        if cfg.tracking.log_model:
            tracking.log_model(trained.model, task.image_shape, task.num_classes)
        value = optimized_value(cfg.optimized_metric, trained.history, metrics)
        log.info(
            "run %s: best val_accuracy %.4f, test_accuracy %.4f, %s=%.4f, %.0f s",
            run.info.run_id,
            metrics["best_val_accuracy"],
            metrics["test_accuracy"],
            cfg.optimized_metric,
            value,
            train_time,
        )
    return value


def release_earlier_jobs() -> None:
    """Start from a clean Keras state: the trials of a sweep share this process.

    `clear_session()` alone leaks every earlier job's train step in TensorFlow 2.21: the
    optimizer's gradient all-reduce registers a `CustomGradient-<n>` in TensorFlow's global
    gradient registry, never removed, which pins that step's graph and the variables it captured
    (tensorflow/tensorflow#80895, keras-team/tf-keras#286; the fix proposed upstream,
    keras-team/tf-keras#898, is unreleased). No library call drops them, so we do: nothing traced
    by an earlier job runs again, and the registry is private, so a TensorFlow without it is left
    alone.
    """
    import keras
    from tensorflow.python.framework import ops

    registry = getattr(getattr(ops, "_gradient_registry", None), "_registry", None)
    if isinstance(registry, dict):
        for name in [name for name in registry if str(name).startswith("CustomGradient-")]:
            del registry[name]
    keras.backend.clear_session(free_memory=True)  # also collects the graphs now unpinned


def summary_metrics(trained, test, train_time: float, model_file: Path, skipped: int) -> dict:
    """The reference's comparison columns for one run."""
    import numpy as np

    model = trained.model
    trainable = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    total = int(model.count_params())
    history = trained.history
    return {
        "test_loss": test.loss,
        "test_accuracy": test.accuracy,
        "best_val_accuracy": max(history.get("val_accuracy", [float("nan")])),
        "final_train_accuracy": history.get("accuracy", [float("nan")])[-1],
        "epochs_run": len(history.get("loss", [])),
        "train_time_s": train_time,
        "total_params": total,
        "trainable_params": trainable,
        "model_size_mb": model_file.stat().st_size / 1e6,
        "skipped_files": skipped,
    }


def optimized_value(name: str, history: dict[str, list[float]], metrics: dict) -> float:
    """A final metric by name, or the best epoch of a per-epoch one (lowest for losses)."""
    if name in metrics:
        return float(metrics[name])
    if name in history:
        values = history[name]
        return float(min(values) if "loss" in name else max(values))
    raise ExperimentError(
        f"optimized_metric={name!r} is not recorded; use a per-epoch metric "
        f"({', '.join(sorted(history))}) or a final one ({', '.join(sorted(metrics))})"
    )


def output_dir(root: str, name: str) -> Path:
    """Hydra's output directory for this job, or a fresh one under `root`/`name`."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        runtime = HydraConfig.get().runtime
        if runtime.get("output_dir"):
            return Path(runtime.output_dir)
    parent = Path(root) / str(name)
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=time.strftime("%Y-%m-%d_%H-%M-%S-"), dir=parent))


def task_overrides() -> list[str]:
    """The command-line overrides of this job, when Hydra launched it."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return list(HydraConfig.get().overrides.task)
    return []


def run_cli(task_function, cfg: DictConfig):
    """Call `task_function(cfg)`; a user error prints one line and exits 2 in a single run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        return task_function(cfg)
    except ExperimentError as err:
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the sweeper records the failure and goes on
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def main(cfg: DictConfig) -> float:
    """Entry point of `python -m experiments.train`."""
    return run_cli(train, cfg)


if __name__ == "__main__":
    main()
