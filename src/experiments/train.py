"""Train one transfer-learning experiment: `python -m experiments.train [overrides]`.

Compose the config, load the task, build the backbone, train with the strategy, evaluate on the
test split and record everything in MLflow. Returns the value named by `optimized_metric`.
"""

from __future__ import annotations

import json
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


def train(cfg: DictConfig) -> float | tuple[float, ...]:
    """Run the experiment `cfg` describes and return its `optimized_metric` (a tuple of values
    when it names several)."""
    from experiments import tracking
    from experiments.backbones import resolve_weights, weights_id
    from experiments.backend import device_tags, use_backend, use_precision
    from experiments.checkpoints import RunCheckpoints, run_identity
    from experiments.tasks import load_task
    from experiments.validation import validate_config

    # Values, then the backend, data and weights: a bad value or a missing file stops the run
    # before any model or MLflow run exists. Nothing before use_backend imports Keras.
    validate_config(cfg)
    tracking.check_reachable(cfg.tracking)
    identity = run_identity(cfg)
    resume = str(cfg.get("resume", "auto"))
    if resume != "never" and (done := finished_job(cfg, identity)) is not None:
        return done
    use_backend(cfg.backend)
    task = load_task(cfg.task, cfg.paths)
    weights = resolve_weights(cfg.backbone, cfg.paths.weights_dir)

    import keras

    from experiments.augmentation import without_augmentation
    from experiments.backbones import build_backbone
    from experiments.callbacks import EpochLogger, TrackEpochs
    from experiments.reports import evaluate_split, write_reports
    from experiments.strategies import Context, train_with_strategy
    from experiments.sweep import trial_callbacks, trial_tags

    release_earlier_jobs()
    use_precision(cfg.trainer.precision)
    keras.utils.set_random_seed(int(cfg.trainer.seed))
    workdir = output_dir(cfg.paths.output_dir, cfg.task.name)
    tags = tracking.run_tags(cfg, str(workdir)) | device_tags() | trial_tags()
    name = str(cfg.tracking.run_name)
    with tracking.start_run(cfg.tracking, name, tags, identity, resume) as run:
        checkpoints = RunCheckpoints(Path(cfg.paths.checkpoint_dir) / run.run_id)
        if run.resumed:
            records = checkpoints.records()
            log.info("run %s continues after epoch %d", run.run_id, len(records))
            tracking.backfill_metrics(records)
        # A run killed while it was being opened may lack its config or data lineage.
        recorded = tracking.recorded(run.run_id) if run.resumed else set()
        if "config" not in recorded:
            tracking.log_config(cfg, task_overrides())
        if "task" not in recorded:
            tracking.log_task(task)
        base, preprocess = build_backbone(cfg.backbone, task.image_shape, weights)
        ctx = Context(
            cfg,
            task,
            base,
            preprocess,
            workdir,
            weights_id(weights),
            checkpoints,
            callbacks=[EpochLogger(len(task.splits["train"].labels))],
            reporters=[TrackEpochs(), *trial_callbacks(cfg)],
        )
        started = time.perf_counter()
        trained = train_with_strategy(ctx)
        train_time = time.perf_counter() - started

        test = evaluate_split(trained.model, task.splits["test"], task.num_classes)
        metrics = summary_metrics(trained, test, train_time, len(task.skipped))
        # The model that is saved and logged: Keras' own layers only, so that it loads with Keras
        # alone; augmentation is the identity at inference
        serving = without_augmentation(trained.model)
        metrics["model_size_mb"] = model_size_mb(serving, workdir, cfg.tracking.log_model)
        tracking.log_metrics(metrics)
        if trained.feature_cache:
            tracking.set_tags({"feature_cache": trained.feature_cache})
        augmentation = (
            trained.model.get_layer("augmentation")
            if any(layer.name == "augmentation" for layer in trained.model.layers)
            else None
        )
        # The `augmentation` tag is what was asked; two_stage trains without it.
        tracking.set_tags({"augmentation_applied": str(augmentation is not None).lower()})
        reports = write_reports(
            workdir / "reports",
            test,
            task.splits["test"],
            task.class_names,
            trained.history,
            augmentation,
        )
        for path in reports:
            tracking.log_artifact(path, artifact_path="evaluation")
        if cfg.tracking.log_model:
            tracking.log_model(serving, task.image_shape, task.num_classes)
        value = optimized_values(cfg.optimized_metric, trained.history, metrics)
        tracking.set_tags({"returned_value": json.dumps(value)})
        log.info(
            "run %s: best val_accuracy %.4f, test_accuracy %.4f, %s, %.0f s",
            run.run_id,
            metrics["best_val_accuracy"],
            metrics["test_accuracy"],
            returned_text(cfg.optimized_metric, value),
            train_time,
        )
    checkpoints.remove()  # FINISHED: the model is logged, the resumable state has done its job
    return value


def finished_job(cfg: DictConfig, identity: str) -> float | tuple[float, ...] | None:
    """In a multirun run again, the value of this job if it already FINISHED in that sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN):
        return None
    from experiments import tracking

    tracking.set_tracking(cfg.tracking)
    run = tracking.finished_sweep_job(identity)
    if run is None or "returned_value" not in run.data.tags:
        return None
    text = run.data.tags["returned_value"]
    value = json.loads(text) if text.startswith("[") else float(text)  # JSON, or repr(float)
    value = tuple(value) if isinstance(value, list) else value
    log.info(
        "already finished in this sweep as run %s: %s",
        run.info.run_id,
        returned_text(cfg.optimized_metric, value),
    )
    return value


def model_size_mb(model, workdir: Path, logged: bool) -> float:
    """The size of the saved `.keras` file. The file stays in `workdir` only when the model is
    not `logged` to MLflow, so that a model is stored once."""
    path = workdir / "model.keras"
    model.save(path)
    size = path.stat().st_size / 1e6
    if logged:
        path.unlink()
    return size


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

    if keras.backend.backend() == "tensorflow":
        _drop_custom_gradients()
    keras.backend.clear_session(free_memory=True)  # also collects the graphs now unpinned


def _drop_custom_gradients() -> None:
    from tensorflow.python.framework import ops

    registry = getattr(getattr(ops, "_gradient_registry", None), "_registry", None)
    if isinstance(registry, dict):
        for name in [name for name in registry if str(name).startswith("CustomGradient-")]:
            del registry[name]


def summary_metrics(trained, test, train_time: float, skipped: int) -> dict:
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
        "skipped_files": skipped,
    }


def optimized_values(names, history: dict[str, list[float]], metrics: dict):
    """What the job returns to a sweeper: the value of `optimized_metric`, or a tuple of values
    when it names several (a multi-objective study)."""
    if isinstance(names, str):
        return optimized_value(names, history, metrics)
    return tuple(optimized_value(str(name), history, metrics) for name in names)


def returned_text(names, value) -> str:
    if isinstance(names, str):
        return f"{names}={value:.4f}"
    return ", ".join(f"{n}={v:.4f}" for n, v in zip(names, value, strict=True))


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
    """Call `task_function(cfg)`. In a single run a user error prints one line and exits 2, and
    a signal prints how to resume and exits 128 + its number; a multirun handles both itself."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from experiments import interrupts
    from experiments.files import DISK_FULL
    from experiments.interrupts import Interrupted

    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        # Here too, not only in main(): a launcher such as submitit calls this in its own process.
        with interrupts.handle_signals():
            try:
                return task_function(cfg)
            except Interrupted as err:
                if multirun:  # submitit: requeue this job, whose run then resumes
                    interrupts.pass_on(err.signum)
                raise
    except ExperimentError as err:
        if multirun:
            raise  # the sweeper records the failure and goes on
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        if err.errno not in DISK_FULL or multirun:
            raise
        print(
            f"error: no space left writing {err.filename or 'a file'} ({os.strerror(err.errno)}); "
            f"free space there, then run the same command again to resume",
            file=sys.stderr,
        )
        sys.exit(2)
    except Interrupted as err:
        if multirun:
            raise  # ends the whole sweep: see main()
        print(f"interrupted by {err.name}: {resume_hint(cfg)}", file=sys.stderr)
        sys.exit(err.exit_code)


def resume_hint(cfg: DictConfig) -> str:
    """One line: what an interrupted run kept and how to continue it."""
    from experiments import tracking
    from experiments.checkpoints import RunCheckpoints

    run_id = tracking.last_run_id()
    if run_id is None:
        return "no run was started yet; run the same command again"
    if tracking.run_status(run_id) == "FINISHED":
        return f"run {run_id} had just FINISHED; nothing is lost"
    state = RunCheckpoints(Path(str(cfg.paths.checkpoint_dir)) / run_id)
    return (
        f"run {run_id} ended KILLED with {state.completed_epochs()} complete epoch(s) saved in "
        f"{state.root}; run the same command again to resume it (resume=never starts afresh)"
    )


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def hydra_main(cfg: DictConfig) -> float | tuple[float, ...]:
    return run_cli(train, cfg)


def main():
    """Entry point of `python -m experiments.train`: SIGTERM and SIGINT end a run cleanly."""
    cli_with_signals(hydra_main)


def cli_with_signals(entry) -> None:
    """Run a Hydra entry point with SIGTERM and SIGINT handled; a multirun stopped by one
    prints how to complete it and exits 128 + its number."""
    from experiments.interrupts import Interrupted, handle_signals

    with handle_signals():
        try:
            entry()
        except Interrupted as err:
            print(
                f"interrupted by {err.name}: run the same command again to complete the sweep "
                f"(finished jobs are skipped, the interrupted one resumes; resume=never runs all)",
                file=sys.stderr,
            )
            sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
