"""Which run a model is registered from: an experiment's best training run by a metric, a
sweep's best trial or one of its Pareto front; and what its registered version says of it."""

from __future__ import annotations

from experiments.core.errors import ExperimentError
from experiments.tracking import tags as T

KEY_METRICS = ("test_accuracy", "best_val_accuracy", "test_loss", "test_ece", "test_nll")
LOWER_IS_BETTER = ("loss", "ece", "nll", "brier", "time", "size", "params")


def best_run(experiment: str, metric: str):
    """The FINISHED training run of `experiment` with the best `metric` (lowest for losses,
    errors, times and sizes)."""
    from experiments import tracking

    runs = [
        r
        for r in tracking.run_rows("attributes.status = 'FINISHED'", experiment=experiment)
        if metric in r.metrics and not ({T.SWEEP, T.GROUP, T.RUN_TYPE} & set(r.tags))
    ]
    if not runs:
        raise ExperimentError(
            f"--best {experiment}: no FINISHED training run of that experiment records {metric}; "
            f"list them with python -m experiments.compare {experiment}"
        )
    lowest = any(word in metric for word in LOWER_IS_BETTER)
    return (min if lowest else max)(runs, key=lambda r: r.metrics[metric])


def sweep_run(parent_id: str, trial: int | None):
    """The run of the sweep's best trial, or of trial `trial` of its Pareto front."""
    from experiments import tracking

    parent = tracking.find_run(parent_id)
    if parent is None or parent.tags.get(T.SWEEP) != "true":
        raise ExperimentError(f"--sweep {parent_id}: not a sweep's parent run in this store")
    # A study resumed by a later command has a parent run for each command, all of one identity:
    # its best trial may be a child of any of them.
    identity = parent.tags.get(T.SWEEP_IDENTITY)
    parents = (
        [r.run_id for r in tracking.run_rows(f"tags.{T.SWEEP_IDENTITY} = '{identity}'")]
        if identity
        else [parent_id]
    )
    trials = {
        int(r.tags[T.OPTUNA_TRIAL]): r
        for p in parents
        for r in tracking.run_rows(f"tags.{T.PARENT_RUN} = '{p}'")
        if T.OPTUNA_TRIAL in r.tags and r.status == "FINISHED"
    }
    front = sorted(n for n, r in trials.items() if r.tags.get(T.PARETO) == "true")
    if trial is None:
        if T.BEST_TRIAL not in parent.tags:
            raise ExperimentError(
                f"--sweep {parent_id}: a study of several objectives has no single best trial; "
                f"choose one of its Pareto front with --trial ({', '.join(map(str, front))})"
            )
        trial = int(parent.tags[T.BEST_TRIAL])
    elif front and trial not in front:
        raise ExperimentError(
            f"--trial {trial} is not on the sweep's Pareto front: {', '.join(map(str, front))}"
        )
    if trial not in trials:
        raise ExperimentError(f"--trial {trial}: no FINISHED run of that trial in the sweep")
    return trials[trial]


def version_tags(run) -> dict[str, str]:
    """What a registered version says of its source: run, key metrics, data, config."""
    from experiments import tracking

    tags = {"source_run_id": run.run_id, "source_experiment": run.experiment}
    tags |= {f"metric.{m}": f"{run.metrics[m]:.6g}" for m in KEY_METRICS if m in run.metrics}
    tags |= {
        k: run.tags[k] for k in (T.TASK, T.BACKBONE, T.STRATEGY, T.CLASS_NAMES) if k in run.tags
    }
    digests = tracking.registry.dataset_digests(run.run_id)
    tags |= {f"data.{split}.digest": digest for split, digest in digests.items()}
    tags["config"] = tracking.load_text(f"runs:/{run.run_id}/config/config.yaml")
    return tags
