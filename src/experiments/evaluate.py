"""Re-evaluate a logged model on a split: `python -m experiments.evaluate model=runs:/<id>/model`.

The results go to a new MLflow run tagged with the source run, with the same evaluation
artifacts as training.
"""

from __future__ import annotations

import logging
import re

import hydra
from omegaconf import DictConfig, OmegaConf

from experiments import config_dir
from experiments.cli import cli_with_signals, output_dir, run_cli
from experiments.errors import ExperimentError

log = logging.getLogger("experiments.evaluate")


def evaluate(cfg: DictConfig) -> float:
    """Evaluate `cfg.model` on `cfg.split` of the task; the accuracy."""
    from experiments import tracking
    from experiments.backend import use_backend
    from experiments.calibration import calibration_metrics
    from experiments.reports import evaluate_split, per_class_metrics, write_reports
    from experiments.tasks import SPLITS, load_task

    use_backend(cfg.backend)  # before MLflow loads the model with Keras
    if cfg.split not in SPLITS:
        raise ExperimentError(f"split={cfg.split} is unknown; use one of {', '.join(SPLITS)}")
    tracking.open_store(str(cfg.tracking.uri), cfg.tracking.get("outbox_dir"))
    source = source_run(cfg)
    model = load_model(str(cfg.model))
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
        tracking.log_metrics(
            {
                f"{cfg.split}_loss": result.loss,
                f"{cfg.split}_accuracy": result.accuracy,
                "skipped_files": len(task.skipped),
                "turned_files": len(task.turned),
            }
            | calibration_metrics(result.probabilities, result.labels, cfg.split)
            | per_class_metrics(result, task.class_names, cfg.split)
        )
        for path in write_reports(
            workdir / "reports", result, task.splits[cfg.split], task.class_names
        ):
            tracking.log_artifact(path, artifact_path="evaluation")
    log.info(
        "%s on %s/%s: accuracy %.4f, loss %.4f",
        cfg.model,
        task.name,
        cfg.split,
        result.accuracy,
        result.loss,
    )
    return result.accuracy


def source_run(cfg: DictConfig):
    """The run that logged `cfg.model` when it is a `runs:/` URI, else None."""
    from experiments import tracking

    match = re.match(r"runs:/([0-9a-f]+)/", str(cfg.model))
    if not match:
        return None
    source = tracking.find_run(match.group(1))
    if source is None:
        raise ExperimentError(
            f"model={cfg.model}: no run {match.group(1)} in {cfg.tracking.uri}; copy the run id "
            f"from the MLflow UI or from python -m experiments.compare"
        )
    return source


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
        raise ExperimentError("no task given and model= is not a runs:/ URI; add task=<name>")
    from experiments import tracking

    text = tracking.load_text(f"runs:/{source.run_id}/config/config.yaml")
    return OmegaConf.create(text).task


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="evaluate")
def hydra_main(cfg: DictConfig) -> float:
    return run_cli(evaluate, cfg)


def main():
    """Entry point of `python -m experiments.evaluate`."""
    cli_with_signals(hydra_main)


if __name__ == "__main__":
    main()
