"""A logged model evaluated again, as `python -m experiments.evaluate` runs it (its usage is
there): the split scored and recorded in a new MLflow run tagged with its source run, with the
same evaluation artifacts as training, and with `compare_to` a second model scored on the same
images and tested against the first (McNemar's exact test, `evaluation.statistics`).
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf

from experiments.core.errors import ExperimentError
from experiments.core.job import output_dir

log = logging.getLogger("experiments.evaluate")


def evaluate(cfg: DictConfig) -> float:
    """Evaluate `cfg.model` on `cfg.split` of the task; the accuracy."""
    from experiments import tracking
    from experiments.core.backend import use_backend
    from experiments.data.splits import SPLITS
    from experiments.data.tasks import load_task
    from experiments.evaluation.calibration import calibration_metrics
    from experiments.evaluation.reports import (
        evaluate_split,
        macro_f1_metrics,
        per_class_metrics,
        write_reports,
    )
    from experiments.evaluation.statistics import wilson_interval
    from experiments.pipeline.validation import MAX_BATCH, number

    # The arguments first, before MLflow, Keras or TensorFlow is imported (10 s).
    if cfg.split not in SPLITS:
        raise ExperimentError(f"split={cfg.split} is unknown; use one of {', '.join(SPLITS)}")
    tracking.registry.check_model_uri(str(cfg.model))
    number(cfg, "batch_size", int, low=1, high=MAX_BATCH)
    tracking.check_store(str(cfg.tracking.uri), must_exist=True)  # it records an evaluation run
    use_backend(cfg.backend)  # before MLflow loads the model with Keras
    tracking.open_store(str(cfg.tracking.uri), cfg.tracking.get("outbox_dir"))
    source = source_run(str(cfg.model))
    model = load_model(str(cfg.model))
    other_uri = compared_uri(str(cfg.model), cfg.get("compare_to"))
    other = None
    if other_uri:
        source_run(other_uri)  # an unknown alias or version is one line
        other = load_model(other_uri)
        if other.input_shape != model.input_shape or other.output_shape != model.output_shape:
            raise ExperimentError(
                f"compare_to={cfg.compare_to}: {other_uri} takes {other.input_shape[1:]} and "
                f"gives {other.output_shape[1:]}, {cfg.model} {model.input_shape[1:]} and "
                f"{model.output_shape[1:]}; compare models of the same task and image size"
            )
    # The images must have the size the model was built for, whatever the task file says.
    task_cfg = OmegaConf.merge(
        cfg.get("task") or source_task(source), {"image_size": list(model.input_shape[1:3])}
    )
    task = load_task(task_cfg, cfg.paths)
    experiment = cfg.tracking.experiment or (source.experiment if source else task_cfg.name)
    tracking_cfg = OmegaConf.merge(cfg.tracking, {"experiment": experiment})
    workdir = output_dir(cfg.paths.output_dir, task.name)
    name = f"evaluate-{task.name}-{cfg.split}"
    with tracking.start_run(tracking_cfg, name, evaluation_tags(cfg, task, source)):
        tracking.log_task(task)
        result = evaluate_split(model, task.splits[cfg.split], task.num_classes, cfg.batch_size)
        n = len(result.labels)
        low, high = wilson_interval(int((result.predictions == result.labels).sum()), n)
        tracking.log_metrics(
            {
                f"{cfg.split}_loss": result.loss,
                f"{cfg.split}_accuracy": result.accuracy,
                f"{cfg.split}_accuracy_ci95_low": low,
                f"{cfg.split}_accuracy_ci95_high": high,
                "skipped_files": len(task.skipped),
                "turned_files": len(task.turned),
            }
            | calibration_metrics(result.probabilities, result.labels, cfg.split, intervals=True)
            | macro_f1_metrics(result, task.num_classes, cfg.split)
            | per_class_metrics(result, task.class_names, cfg.split)
        )
        for path in write_reports(
            workdir / "reports", result, task.splits[cfg.split], task.class_names, cfg.split
        ):
            tracking.log_artifact(path, artifact_path="evaluation")
        if other is not None:
            paired = compare_models(other, other_uri, result, task, cfg)
    log.info(
        "%s on %s/%s: accuracy %.4f, loss %.4f",
        cfg.model,
        task.name,
        cfg.split,
        result.accuracy,
        result.loss,
    )
    if other is not None:
        log.info("%s", comparison_lines(str(cfg.model), other_uri, cfg.split, paired))
    return result.accuracy


def compared_uri(model: str, compare_to) -> str | None:
    """The URI `compare_to` names: an alias or version of `model`'s registered model, or a
    model URI of its own."""
    if not compare_to:
        return None
    other = str(compare_to)
    if ":/" in other:
        return other
    from experiments import tracking

    registered = tracking.registry.registered(model)
    if registered is None:
        raise ExperimentError(
            f"compare_to={other} names an alias or version, which needs model=models:/<name>@... "
            f"(a registered model); or give compare_to a whole model URI, e.g. runs:/<id>/model"
        )
    name = registered[0]
    return f"models:/{name}/{other}" if other.isdigit() else f"models:/{name}@{other}"


def compare_models(other, other_uri: str, result, task, cfg: DictConfig):
    """Evaluate `other` on the images `result` came from; logged as `compared_*` metrics."""
    from experiments import tracking
    from experiments.evaluation.reports import evaluate_split, paired_comparison

    split = cfg.split
    theirs = evaluate_split(other, task.splits[split], task.num_classes, cfg.batch_size)
    paired = paired_comparison(result, theirs)
    tracking.set_tags({"compare_to": other_uri})
    tracking.log_metrics(
        {
            f"compared_{split}_accuracy": paired.other_accuracy,
            f"compared_{split}_loss": theirs.loss,
            f"{split}_accuracy_difference": paired.difference,
            f"{split}_accuracy_difference_ci95_low": paired.ci95[0],
            f"{split}_accuracy_difference_ci95_high": paired.ci95[1],
            "mcnemar_p_value": paired.p_value,
        }
    )
    return paired


def comparison_lines(model: str, other_uri: str, split: str, paired) -> str:
    """What a comparison says: both accuracies, the difference and the paired test."""
    width = max(len(model), len(other_uri))
    return "\n".join(
        [
            f"{split} accuracy of {model:<{width}}  {paired.accuracy:.4f}",
            f"{split} accuracy of {other_uri:<{width}}  {paired.other_accuracy:.4f}",
            f"difference {paired.difference:+.4f} (95% CI {paired.ci95[0]:+.4f} to "
            f"{paired.ci95[1]:+.4f}); on the same {split} images, "
            f"{paired.only_this_right} right only by the first, {paired.only_other_right} only "
            f"by the second: McNemar's exact test p = {paired.p_value:.4g}",
        ]
    )


def source_run(uri: str):
    """The run that logged the model at `uri` (`runs:/` or `models:/`), else None."""
    from experiments import tracking

    if not uri.startswith(("runs:/", "models:/")):
        return None
    return tracking.registry.source_run(uri)


def load_model(uri: str):
    """The logged Keras model at `uri`; a bad URI is one line."""
    from experiments import tracking

    try:
        return tracking.load_model(uri)
    except Exception as err:
        raise ExperimentError(
            f"cannot load model={uri} ({str(err).splitlines()[0][:300]}); give a logged "
            f"model URI such as runs:/<run_id>/model"
        ) from None


def evaluation_tags(cfg: DictConfig, task, source) -> dict[str, str]:
    """What the evaluation run is: its split and model, and what the source run was."""
    from experiments.tracking import tags as T

    tags = {
        T.RUN_TYPE: "evaluate",
        T.TASK: task.name,
        "split": cfg.split,
        "source_model": str(cfg.model),
    }
    if source is not None:
        tags["source_run_id"] = source.run_id
        for key in (T.BACKBONE, T.STRATEGY, T.AUGMENTATION):
            if key in source.tags:
                tags[key] = source.tags[key]
    return tags


def source_task(source) -> DictConfig:
    """The task config recorded with the source run."""
    if source is None:
        raise ExperimentError(
            "no task given and model= is not a runs:/ or models:/ URI; add task=<name>"
        )
    from experiments import tracking

    text = tracking.load_text(f"runs:/{source.run_id}/config/config.yaml")
    return OmegaConf.create(text).task
