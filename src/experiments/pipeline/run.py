"""One run of an experiment, as `python -m experiments.train` runs it.

Check the config, load the task, build the backbone, train with the strategy, evaluate on the
test split and record everything in MLflow. Returns the value named by `optimized_metric`.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import ExitStack
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from experiments.core.job import in_multirun, output_dir, task_overrides

# The train command's log: what a run says, under the name of the command that ran it.
log = logging.getLogger("experiments.train")


def train(cfg: DictConfig) -> float | tuple[float, ...]:
    """Run the experiment `cfg` describes and return its `optimized_metric` (a tuple of values
    when it names several)."""
    from experiments import tracking
    from experiments.core.backend import (
        device_tags,
        set_seed,
        tensorflow_left_unimported,
        use_backend,
        use_precision,
    )
    from experiments.core.compile_cache import jax_compile_seconds, use_compilation_cache
    from experiments.core.devices import use_device_slot
    from experiments.core.phases import Phases
    from experiments.core.processes import watch_anon_memory
    from experiments.data.tasks import load_task
    from experiments.evaluation import figures
    from experiments.model.backbones import resolve_weights
    from experiments.pipeline.groups import is_group, train_group
    from experiments.pipeline.instantiation import check_buildable
    from experiments.pipeline.validation import validate_config
    from experiments.sweeps.trial import job_run_name, trial_tags
    from experiments.training.checkpoints import run_identity
    from experiments.training.distribution import distribution_tags, use_devices

    phases = Phases()
    watch_anon_memory()  # peak_anon_mb: what the run holds in memory, not what it maps
    # Values, then the backend, data and weights: a bad value or a missing file stops the run
    # before any model or MLflow run exists. Nothing before use_backend imports Keras.
    with phases.phase("startup"):
        validate_config(cfg)
        tracking.check_tracking(cfg.tracking)
        identity = run_identity(cfg)
        resume = str(cfg.get("resume", "auto"))
        if resume != "never" and (done := finished_job(cfg, identity)) is not None:
            return done
        # Before the backend is imported: it reads these settings then.
        use_compilation_cache(cfg)
        use_device_slot()
        use_backend(cfg.backend)
        check_buildable(cfg)  # with Keras: the optimizer, callbacks and layers built once
        devices = use_devices(cfg.trainer.get("devices", 1), int(cfg.trainer.batch_size))
    with phases.phase("data"):
        task = load_task(cfg.task, cfg.paths)
        weights = resolve_weights(cfg.backbone, cfg.paths.weights_dir)
    if is_group(cfg):  # repeats, folds: each member is a run of this function, on cached data
        return train_group(cfg, train)

    from experiments.training.strategies import train_with_strategy

    with ExitStack() as keras_scope:
        with phases.phase("build"):
            release_earlier_jobs()
            if OmegaConf.select(cfg, "evaluation.figure_worker", default=True):
                figures.start()  # to draw the reports while the run records its model
            else:  # an earlier run of this process may have started one
                figures.stop()
            keras_scope.enter_context(tensorflow_left_unimported())
            use_precision(cfg.trainer.precision)
            set_seed(cfg.trainer.seed)
        workdir = output_dir(cfg.paths.output_dir, cfg.task.name)
        tags = tracking.run_tags(cfg, str(workdir)) | device_tags() | trial_tags()
        tags |= distribution_tags(devices, int(cfg.trainer.batch_size))
        name = job_run_name(str(cfg.tracking.run_name))
        opening = time.perf_counter()  # opening the run is recording, up to its config, lineage
        with tracking.start_run(cfg.tracking, name, tags, identity, resume) as active:
            checkpoints = open_checkpoints(cfg, active)
            record_opening(cfg, task, active)
            phases.add("record", time.perf_counter() - opening)
            with phases.phase("build"):
                ctx = training_context(cfg, task, weights, workdir, checkpoints)
            started = time.perf_counter()
            compiled = jax_compile_seconds()  # None: the backend does not say
            with phases.phase("train"):
                trained = train_with_strategy(ctx)
            if compiled is not None:
                compiled = jax_compile_seconds() - compiled
            phases.split_compile(epoch_times(ctx), compiled)
            train_time = time.perf_counter() - started
            value = record_results(cfg, task, trained, train_time, workdir, active, phases)
    checkpoints.remove()  # FINISHED: the model is logged, the resumable state has done its job
    log.info("run %s: %s", active.run_id, phases.line())
    return value


def open_checkpoints(cfg: DictConfig, run):
    """The run's resumable state; a resumed run first logs the epochs it lacks."""
    from experiments import tracking
    from experiments.training.checkpoints import RunCheckpoints

    checkpoints = RunCheckpoints(Path(cfg.paths.checkpoint_dir) / run.run_id)
    if run.resumed:
        records = checkpoints.records()
        log.info("run %s continues after epoch %d", run.run_id, len(records))
        tracking.backfill_metrics(records)
    return checkpoints


def record_opening(cfg: DictConfig, task, run) -> None:
    """The config and the data lineage, unless a resumed run holds them already (a run killed
    while it was being opened may lack either)."""
    from experiments import tracking

    recorded = tracking.recorded(run.run_id) if run.resumed else set()
    if "config" not in recorded:
        tracking.log_config(cfg, task_overrides())
    if "task" not in recorded:
        tracking.log_task(task)


def training_context(cfg: DictConfig, task, weights, workdir: Path, checkpoints):
    """The backbone built on the task's images, with the callbacks a run trains with."""
    from experiments.data.inputs import even_batch_size
    from experiments.evaluation.reports import EVALUATION_BATCH
    from experiments.model.backbones import build_backbone, weights_id
    from experiments.model.forward import CompileAhead, compile_ahead
    from experiments.sweeps.trial import trial_callbacks
    from experiments.tracking.callbacks import TrackEpochs
    from experiments.training.callbacks import EpochLogger
    from experiments.training.strategies import Context

    base, preprocess = build_backbone(cfg.backbone, task.image_shape, weights)
    callbacks = [EpochLogger(len(task.splits["train"].labels))]
    if compile_ahead(OmegaConf.select(cfg, "evaluation.compile_ahead", default="auto")):
        test = task.splits["test"]
        shape, dtype = task.image_shape, test.images.dtype
        batch_size = even_batch_size(len(test.labels), EVALUATION_BATCH)
        callbacks.append(CompileAhead(batch_size, shape, dtype))
    return Context(
        cfg,
        task,
        base,
        preprocess,
        workdir,
        weights_id(weights),
        checkpoints,
        callbacks=callbacks,
        reporters=[TrackEpochs(), *trial_callbacks(cfg)],
    )


def record_results(cfg: DictConfig, task, trained, train_time: float, workdir: Path, run, phases):
    """Evaluate on the test split and record the metrics, reports, model and where the time
    went; the value the job returns to a sweeper."""
    from experiments import tracking
    from experiments.evaluation import figures
    from experiments.evaluation.calibration import calibration_metrics
    from experiments.evaluation.reports import (
        classification_reports,
        evaluate_split,
        macro_f1_metrics,
        per_class_metrics,
        report_figures,
        write_predictions,
    )
    from experiments.evaluation.summary import optimized_values, returned_text, summary_metrics
    from experiments.model.augmentation import without_augmentation

    tags = tracking.tags
    reports = (workdir / "reports").absolute()  # the figure worker may not share our directory
    with phases.phase("evaluate"):
        test = evaluate_split(trained.eval_model, trained.eval_split(task), task.num_classes)
        scaled, scaled_figure = temperature_scaled(cfg, trained, task, test, reports)
    with phases.phase("record"):
        augmentation = (
            trained.model.get_layer("augmentation")
            if any(layer.name == "augmentation" for layer in trained.model.layers)
            else None
        )
        # Drawn by the figure worker while the model is saved and logged here
        drawing = figures.draw(
            report_figures(
                reports, test, task.splits["test"], task.class_names, trained.history, augmentation
            )
            + scaled_figure
        )
        written = classification_reports(reports, test, task.class_names)
        written += write_predictions(reports, test, task.splits["test"], task.class_names)
        metrics = summary_metrics(cfg, trained, test, train_time, task)
        metrics |= per_class_metrics(test, task.class_names)
        metrics |= macro_f1_metrics(test, task.num_classes)
        metrics |= calibration_metrics(test.probabilities, test.labels, intervals=True) | scaled
        # The model that is saved and logged: Keras' own layers only, so that it loads with
        # Keras alone; augmentation is the identity at inference
        serving = without_augmentation(trained.model)
        if cfg.tracking.log_model:  # saved once, into MLflow, which gives its size
            metrics["model_size_mb"] = tracking.log_model(
                serving, task.image_shape, task.class_names
            )
        else:  # saved into the run's output folder, the only copy
            metrics["model_size_mb"] = saved_model_mb(serving, workdir)
        tracking.log_metrics(metrics)
        if trained.feature_cache:
            tracking.set_tags({tags.FEATURE_CACHE: trained.feature_cache})
        # The `augmentation` tag is what was asked; two_stage trains without it.
        tracking.set_tags({tags.AUGMENTATION_APPLIED: str(augmentation is not None).lower()})
        for path in [*written, *drawing.results()]:
            tracking.log_artifact(path, artifact_path="evaluation")
        value = optimized_values(cfg.optimized_metric, trained.history, metrics)
        tracking.set_tags({tags.RETURNED_VALUE: json.dumps(value)})
    tracking.log_metrics(phases.metrics() | compilation_cache_metrics())
    if phases.compile_source:  # time_compile_s measured (JAX's events) or estimated (epochs)
        tracking.set_tags({tags.COMPILE_TIME: phases.compile_source})
    log.info(
        "run %s: val_accuracy %.4f (saved epoch %d; best %.4f), test_accuracy %.4f "
        "(95%% CI %.4f to %.4f), %s, %.0f s",
        run.run_id,
        metrics["saved_val_accuracy"],
        metrics["saved_epoch"],
        metrics["best_val_accuracy"],
        metrics["test_accuracy"],
        metrics["test_accuracy_ci95_low"],
        metrics["test_accuracy_ci95_high"],
        returned_text(cfg.optimized_metric, value),
        train_time,
    )
    return value


def temperature_scaled(cfg: DictConfig, trained, task, test, outdir: Path):
    """With `evaluation.temperature_scaling`: (the temperature fitted on the validation split,
    the validation NLL before and after it and the test split's calibration after it, as
    metrics; the call that draws its reliability diagram, for `figures.draw`); else ({}, [])."""
    if not OmegaConf.select(cfg, "evaluation.temperature_scaling", default=False):
        return {}, []
    from experiments.evaluation.calibration import (
        calibration_metrics,
        fit_temperature,
        reliability_png,
    )
    from experiments.evaluation.reports import evaluate_split

    val = evaluate_split(trained.eval_model, trained.eval_split(task, "val"), task.num_classes)
    temperature = fit_temperature(val.probabilities, val.labels)
    scaled_val = temperature.apply(val.probabilities)
    scaled_test = temperature.apply(test.probabilities)
    metrics = {
        "temperature": temperature.value,
        "val_nll": calibration_metrics(val.probabilities, val.labels, "val")["val_nll"],
        "val_scaled_nll": calibration_metrics(scaled_val, val.labels, "val_scaled")[
            "val_scaled_nll"
        ],
        **calibration_metrics(scaled_test, test.labels, "test_scaled"),
    }
    outdir.mkdir(parents=True, exist_ok=True)
    title = f"test, T={temperature.value:.2f}:"
    figure = (reliability_png, (outdir / "reliability_scaled.png", scaled_test, test.labels, title))
    return metrics, [figure]


def epoch_times(ctx) -> list[list[float]]:
    """The epoch times of each fit the run made, as its EpochLogger saw them."""
    from experiments.training.callbacks import EpochLogger

    return next((c.fits for c in ctx.callbacks if isinstance(c, EpochLogger)), [])


def compilation_cache_metrics() -> dict[str, float]:
    """The persistent compilation cache's hits and misses in this run, where it keeps count."""
    from experiments.core.compile_cache import compilation_cache_counts

    return {f"compile_cache_{k}": v for k, v in compilation_cache_counts(reset=True).items()}


def finished_job(cfg: DictConfig, identity: str) -> float | tuple[float, ...] | None:
    """In a multirun run again, the value of this job if it already FINISHED in that sweep."""
    if not in_multirun():
        return None
    from experiments import tracking
    from experiments.evaluation.summary import returned_text

    tracking.set_tracking(cfg.tracking)
    run = tracking.finished_sweep_job(identity)
    if run is None or tracking.tags.RETURNED_VALUE not in run.tags:
        return None
    text = run.tags[tracking.tags.RETURNED_VALUE]
    value = json.loads(text) if text.startswith("[") else float(text)  # JSON, or repr(float)
    value = tuple(value) if isinstance(value, list) else value
    log.info(
        "already finished in this sweep as run %s: %s",
        run.run_id,
        returned_text(cfg.optimized_metric, value),
    )
    return value


def saved_model_mb(model, workdir: Path) -> float:
    """Save `model` as `workdir/model.keras`, for a run that logs no model; its size in MB."""
    path = workdir / "model.keras"
    model.save(path)
    return path.stat().st_size / 1e6


def release_earlier_jobs() -> None:
    """Start from a clean Keras state: the trials of a sweep share this process.

    `clear_session()` alone leaks every earlier job's train step in TensorFlow 2.21: the
    optimizer's gradient all-reduce registers a `CustomGradient-<n>` in TensorFlow's global
    gradient registry, never removed, which pins that step's graph and the variables it captured
    (tensorflow/tensorflow#80895, keras-team/tf-keras#286; the fix proposed upstream,
    keras-team/tf-keras#898, is unreleased). No library call drops them, so we do: nothing traced
    by an earlier job runs again, and the registry is private, so a TensorFlow without it is left
    alone.

    The garbage collection that then frees them walks every object the process tracks, most of
    them what it imported (TensorFlow, MLflow, Hydra), which live as long as it: 0.4-0.5 s a
    trial of the quickstart sweep. Once the first job has collected, it moves what is left to the
    collector's permanent generation (`gc.freeze`), so that each later collection walks only what
    jobs made (0.08 s).
    """
    import gc

    import keras

    if keras.backend.backend() == "tensorflow":
        _drop_custom_gradients()
    keras.backend.clear_session(free_memory=True)  # also collects the graphs now unpinned
    if not gc.get_freeze_count():  # the first job: what is left lives as long as the process
        gc.freeze()


def _drop_custom_gradients() -> None:
    from tensorflow.python.framework import ops

    registry = getattr(getattr(ops, "_gradient_registry", None), "_registry", None)
    if isinstance(registry, dict):
        for name in [name for name in registry if str(name).startswith("CustomGradient-")]:
            del registry[name]
