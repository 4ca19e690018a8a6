"""Which run a model is registered from: an experiment's best training run by a metric, a
sweep's best trial or one of its Pareto front; and what its registered version says of it."""

from __future__ import annotations

from dataclasses import dataclass

from experiments.core.errors import ExperimentError
from experiments.tracking import tags as T


def choosing_by_test(what: str, how: str = "add allow_test_selection=true") -> str:
    """The line that refuses to choose a model by its test score, `what` naming the choice."""
    return (
        f"{what} chooses by the test split, whose score then no longer estimates unseen data; "
        f"choose by validation (saved_val_accuracy, val_accuracy, val_loss), or {how} to choose "
        f"by test knowingly"
    )


KEY_METRICS = (
    "test_accuracy",
    "saved_val_accuracy",
    "best_val_accuracy",
    "test_loss",
    "test_ece",
    "test_nll",
)
LOWER_IS_BETTER = ("loss", "ece", "nll", "brier", "time", "size", "params")


@dataclass
class Chosen:
    """What `--best` registers: a run, and the group it stands for when the best was a group."""

    run: object  # a tracking.RunRow
    group: object | None = None
    metric: str = ""


def best_run(experiment: str, metric: str, allow_test: bool = False) -> Chosen:
    """The best of `experiment`'s FINISHED training runs and groups by `metric` (lowest for
    losses, errors, times and sizes): a group counts once, by its members' mean, never by its
    luckiest member. Ties go to the run that started first, then the lower run id.

    Of a best group, the member registered is the one whose `metric` is nearest the group's
    mean (ties: the lower fold, then the lower seed): a typical member, not the best one.
    """
    from experiments import tracking

    if metric.startswith("test_") and not allow_test:
        raise ExperimentError(
            choosing_by_test(f"--best --metric {metric}", "add --allow-test-selection")
        )
    rows = tracking.run_rows("attributes.status = 'FINISHED'", experiment=experiment)
    group_ids = {r.run_id for r in rows if r.tags.get(T.GROUP) == "true"}
    candidates = [
        (r.metrics[f"{metric}_mean"], r)
        for r in rows
        if r.run_id in group_ids and f"{metric}_mean" in r.metrics
    ]
    candidates += [
        (r.metrics[metric], r)
        for r in rows
        if metric in r.metrics
        and not ({T.SWEEP, T.GROUP, T.RUN_TYPE} & set(r.tags))
        and r.tags.get(T.PARENT_RUN) not in group_ids  # a member stands for its group
    ]
    if not candidates:
        raise ExperimentError(
            f"--best {experiment}: no FINISHED training run of that experiment records {metric}; "
            f"list them with python -m experiments.compare {experiment}"
        )
    sign = 1 if any(word in metric for word in LOWER_IS_BETTER) else -1
    value, best = min(candidates, key=lambda c: (sign * c[0], c[1].start_time or 0, c[1].run_id))
    if best.run_id not in group_ids:
        return Chosen(best, metric=metric)
    members = [r for r in rows if r.tags.get(T.PARENT_RUN) == best.run_id and metric in r.metrics]
    if not members:
        raise ExperimentError(f"--best {experiment}: group run {best.run_id} has no member left")

    def order(r):
        fold = r.params.get("task.fold", "None")
        return (
            abs(r.metrics[metric] - value),
            fold if fold != "None" else "",
            int(r.params.get("trainer.seed", 0)),
        )

    return Chosen(min(members, key=order), group=best, metric=metric)


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
    # A trial number means something only within its study (two studies of the same
    # overrides number their trials alike): the parent's study's runs only.
    study = parent.tags.get(T.SWEEP_STUDY, "").split(" in ", 1)[0]
    trials = {
        int(r.tags[T.OPTUNA_TRIAL]): r
        for p in parents
        for r in tracking.run_rows(f"tags.{T.PARENT_RUN} = '{p}'")
        if T.OPTUNA_TRIAL in r.tags
        and r.status == "FINISHED"
        and (not study or r.tags.get(T.OPTUNA_STUDY) == study)
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


def trial_line(run) -> str:
    """What `register --sweep` registered: the trial, its study and the value it returned."""
    return (
        f"trial {run.tags.get(T.OPTUNA_TRIAL)} of study {run.tags.get(T.OPTUNA_STUDY)}: "
        f"returned {run.tags.get(T.RETURNED_VALUE, 'nothing recorded')}"
    )


def version_tags(chosen: Chosen) -> dict[str, str]:
    """What a registered version says of its source: run, key metrics, data, config; and for a
    group's member, the group's mean ± std (n) of the metric it was chosen by."""
    from experiments import tracking

    run = chosen.run
    tags = {"source_run_id": run.run_id, "source_experiment": run.experiment}
    tags |= {f"metric.{m}": f"{run.metrics[m]:.6g}" for m in KEY_METRICS if m in run.metrics}
    tags |= {
        k: run.tags[k] for k in (T.TASK, T.BACKBONE, T.STRATEGY, T.CLASS_NAMES) if k in run.tags
    }
    if chosen.group is not None:
        group, metric = chosen.group, chosen.metric
        tags |= {
            "group_run_id": group.run_id,
            "group_member": run.name,
            "group_member_rule": f"the member nearest the group's mean {metric}",
            f"group.{metric}.mean": f"{group.metrics[f'{metric}_mean']:.6g}",
            f"group.{metric}.std": f"{group.metrics.get(f'{metric}_std', float('nan')):.6g}",
            f"group.{metric}.n": group.tags.get(T.MEMBERS, ""),
        }
    digests = tracking.registry.dataset_digests(run.run_id)
    tags |= {f"data.{split}.digest": digest for split, digest in digests.items()}
    tags["config"] = tracking.load_text(f"runs:/{run.run_id}/config/config.yaml")
    return tags
