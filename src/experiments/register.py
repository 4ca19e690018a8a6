"""Register a run's model in MLflow's model registry, with an alias:

    python -m experiments.register runs:/<run id>/model --name flowers-classifier --alias champion
    python -m experiments.register --best flowers --name flowers-classifier --alias champion
    python -m experiments.register --sweep <parent run id> [--trial N] --name ... --alias ...

`--best` takes the experiment's best FINISHED training run by `--metric` (best_val_accuracy);
`--sweep` the sweep's best trial, or for several objectives the trial `--trial` names from its
Pareto front. The version carries the source run's key metrics, its data digests and its config
as tags. Everything is checked before anything is registered.
"""

from __future__ import annotations

import argparse
import re
import sys

from experiments import compose_project_config
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m experiments.register`."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.register",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", nargs="?", help="runs:/<run id>/model")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--best", metavar="EXPERIMENT", help="the experiment's best run")
    source.add_argument("--sweep", metavar="PARENT_RUN_ID", help="the sweep's best trial")
    parser.add_argument("--trial", type=int, default=None, help="a Pareto front's trial")
    parser.add_argument("--metric", default="best_val_accuracy", help="for --best")
    parser.add_argument("--name", required=True, help="the registered model's name")
    parser.add_argument("--alias", default=None, help="e.g. champion, challenger")
    parser.add_argument("--tracking-uri", default=None, help="default: tracking.uri")
    args = parser.parse_args(argv)
    if sum(x is not None for x in (args.model, args.best, args.sweep)) != 1:
        parser.error("give one of: runs:/<run id>/model, --best EXPERIMENT, --sweep PARENT_RUN_ID")
    from experiments import tracking

    project = compose_project_config()
    try:
        tracking.open_store(
            args.tracking_uri or str(project.tracking.uri), project.tracking.outbox_dir
        )
        if args.model:
            if not re.fullmatch(r"runs:/[0-9a-f]{32}/model", args.model):
                raise ExperimentError(f"{args.model} is not runs:/<run id>/model")
            run = tracking.registry.source_run(args.model)
        elif args.best:
            run = best_run(args.best, args.metric)
        else:
            run = sweep_run(args.sweep, args.trial)
        tracking.registry.require_model(run)
        tags = version_tags(run)
        version, previous = tracking.registry.register(run.run_id, args.name, tags, args.alias)
    except ExperimentError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"registered run {run.run_id} ({run.name}) as {args.name} version {version}")
    if args.alias:
        moved = f", which left version {previous}" if previous and previous != version else ""
        print(f"alias {args.alias} -> version {version}{moved}: models:/{args.name}@{args.alias}")
    return 0


if __name__ == "__main__":
    from experiments.cli import exit_with

    exit_with(main)
