"""Register a run's model in MLflow's model registry, with an alias:

    python -m experiments.register runs:/<run id>/model --name flowers-classifier --alias champion
    python -m experiments.register --best flowers --name flowers-classifier --alias champion
    python -m experiments.register --sweep <parent run id> [--trial N] --name ... --alias ...

`--best` takes the experiment's best FINISHED training run or group by `--metric`
(saved_val_accuracy, the saved model's; a group by its mean, registering its typical member);
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
    parser.add_argument(
        "--metric",
        default="saved_val_accuracy",
        help="for --best: the saved model's score (default: %(default)s); a group's mean counts",
    )
    parser.add_argument(
        "--allow-test-selection",
        action="store_true",
        help="let --best choose by a test_* metric, knowingly (refused by default)",
    )
    parser.add_argument("--name", required=True, help="the registered model's name")
    parser.add_argument("--alias", default=None, help="e.g. champion, challenger")
    parser.add_argument("--tracking-uri", default=None, help="default: tracking.uri")
    args = parser.parse_args(argv)
    if sum(x is not None for x in (args.model, args.best, args.sweep)) != 1:
        parser.error("give one of: runs:/<run id>/model, --best EXPERIMENT, --sweep PARENT_RUN_ID")
    from experiments import tracking
    from experiments.comparison.selection import (
        Chosen,
        best_run,
        sweep_run,
        trial_line,
        version_tags,
    )
    from experiments.tracking import tags as T

    project = compose_project_config()
    try:
        tracking.open_store(
            args.tracking_uri or str(project.tracking.uri), project.tracking.outbox_dir
        )
        tracking.registry.check_names(args.name, args.alias)
        if args.model:
            if not re.fullmatch(r"runs:/[0-9a-f]{32}/model", args.model):
                raise ExperimentError(f"{args.model} is not runs:/<run id>/model")
            chosen = Chosen(tracking.registry.source_run(args.model))
        elif args.best:
            chosen = best_run(args.best, args.metric, args.allow_test_selection)
        else:
            chosen = Chosen(sweep_run(args.sweep, args.trial))
        run = chosen.run
        tracking.registry.require_model(run)
        tags = version_tags(chosen)
        version, previous = tracking.registry.register(run.run_id, args.name, tags, args.alias)
    except ExperimentError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"registered run {run.run_id} ({run.name}) as {args.name} version {version}")
    if args.sweep:
        which = f"--trial {args.trial}" if args.trial is not None else "the sweep's best trial"
        print(f"{which}: {trial_line(run)}")
    if chosen.group is not None:
        metric, group = chosen.metric, chosen.group
        print(
            f"the best was group run {group.run_id} ({metric} mean "
            f"{group.metrics[f'{metric}_mean']:.4f}, n={group.tags.get(T.MEMBERS, '?')}): its "
            f"member {run.name} is the one nearest that mean"
        )
    if args.alias:
        moved = f", which left version {previous}" if previous and previous != version else ""
        print(f"alias {args.alias} -> version {version}{moved}: models:/{args.name}@{args.alias}")
    return 0


if __name__ == "__main__":
    from experiments.cli import exit_with

    exit_with(main)
