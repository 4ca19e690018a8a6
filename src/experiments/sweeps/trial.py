"""The job side of our Optuna sweeper: which trial this job runs, and its epochs reported to it.

The sweeper sets the storage, the study and the trial number in the job's environment: the
storage's URL, which may hold a password, in its own environment, which the job inherits; the
study and the trial through `hydra.job.env_set` (not task overrides). The storage is the channel
between the two.
"""

from __future__ import annotations

import json
import os

from experiments.core.job import SWEEP_OVERRIDES_ENV, fixed_keys, in_multirun, parsed

STORAGE_ENV = "EXPERIMENTS_OPTUNA_STORAGE"
STUDY_ENV = "EXPERIMENTS_OPTUNA_STUDY"
TRIAL_ENV = "EXPERIMENTS_OPTUNA_TRIAL"
# MLflow's SQL stores hold a run name in 250 characters; PostgreSQL refuses a longer one.
MAX_RUN_NAME_CHARS = 250


def this_trial() -> tuple[str, str, int] | None:
    """(storage, study, trial number) when this job runs an Optuna trial, else None."""
    if TRIAL_ENV not in os.environ:
        return None
    return os.environ[STORAGE_ENV], os.environ[STUDY_ENV], int(os.environ[TRIAL_ENV])


def attached_trial():
    """This job's Optuna trial, attached with the sweeper's pruner, for a single-objective
    study; None outside a trial and for several objectives, which Optuna cannot prune."""
    trial_of_job = this_trial()
    if trial_of_job is None:
        return None
    import optuna
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    from experiments.sweeps.studies import open_storage

    storage, name, number = trial_of_job
    # The job decides whether to prune, so it needs the sweeper's pruner, not Optuna's default.
    pruner = HydraConfig.get().sweeper.get("pruner") if HydraConfig.initialized() else None
    study = optuna.load_study(
        study_name=name,
        storage=open_storage(storage),
        pruner=instantiate(pruner) if pruner else optuna.pruners.NopPruner(),
    )
    if len(study.directions) > 1:
        return None
    (frozen,) = [t for t in study.get_trials(deepcopy=False) if t.number == number]
    # optuna.trial.Trial is how a worker attaches to a trial another process asked for; Optuna
    # addresses it by its storage id.
    return optuna.trial.Trial(study, frozen._trial_id)


def trial_callbacks(cfg) -> list:
    """Keras callbacks reporting `optimized_metric` to this job's Optuna trial; [] outside one,
    for a multi-objective study, and for a member of a group, whose trial is the group's."""
    from experiments.core.processes import GROUP_PARENT_ENV

    if this_trial() is None or os.environ.get(GROUP_PARENT_ENV):
        return []
    from optuna_integration import KerasPruningCallback

    trial = attached_trial()
    return [] if trial is None else [KerasPruningCallback(trial, monitor=str(cfg.optimized_metric))]


def report_group(trial, done: int, mean: float) -> None:
    """Report a group's mean value over its first `done` members to its trial (at step
    `done - 1`), and end the group as pruned when the pruner says so."""
    import warnings

    import optuna

    with warnings.catch_warnings():  # a resumed group reports its first steps again
        warnings.filterwarnings("ignore", message=".*already reported")
        trial.report(mean, step=done - 1)
    if trial.should_prune():
        raise optuna.TrialPruned(f"pruned after {done} members, mean value {mean:.4f}")


def trial_tags() -> dict[str, str]:
    """MLflow tags naming the study and trial of this job, if it runs one, and the keys its
    sweep gave it, in a multirun."""
    from experiments.tracking import tags as T

    swept = {T.SWEPT: ",".join(keys)} if (keys := swept_values()) else {}
    trial_of_job = this_trial()
    if trial_of_job is None:
        return swept
    _, name, number = trial_of_job
    return {T.OPTUNA_STUDY: name, T.OPTUNA_TRIAL: str(number)} | swept


def swept_values() -> dict[str, str]:
    """The values this job of a multirun got from its sweep, by config key (a trial's params, a
    grid's point), as the overrides wrote them; {} outside a multirun."""
    from hydra.core.hydra_config import HydraConfig

    if not in_multirun():
        return {}
    # The multirun's fixed overrides, by key: Hydra writes a job's overrides anew (3e-3 becomes
    # 0.003), so keys are compared, not text.
    fixed = fixed_keys(parsed(json.loads(os.environ.get(SWEEP_OVERRIDES_ENV, "[]"))))
    job = parsed(HydraConfig.get().overrides.task)
    return {o.key_or_group: o.value() for o in job if o.key_or_group not in fixed}


def job_run_name(default: str) -> str:
    """The MLflow run name of this job: `default` outside a multirun; in one, what tells it from
    its siblings: its trial (or job) number and swept values, e.g. `trial-3 lr=3e-4
    units=[256,128]`."""
    from hydra.core.hydra_config import HydraConfig

    from experiments.core.processes import GROUP_PARENT_ENV

    if not in_multirun() or os.environ.get(GROUP_PARENT_ENV):  # a group names its members
        return default
    trial = this_trial()
    number = trial[2] if trial else HydraConfig.get().job.num
    values = swept_values()
    short = {key: key.rsplit(".", 1)[-1] for key in values}
    if len(set(short.values())) < len(short):  # two keys end alike: say them whole
        short = {key: key for key in values}
    parts = [f"{short[key]}={short_value(value)}" for key, value in values.items()]
    return " ".join([f"trial-{number}", *parts])[:MAX_RUN_NAME_CHARS]


def short_value(value) -> str:
    """A swept value as a run name shows it: floats to 2 significant digits (`3e-4`, `0.25`),
    lists without spaces."""
    if isinstance(value, float):
        if value != 0 and not 1e-3 <= abs(value) < 1e4:
            mantissa, exponent = f"{value:.1e}".split("e")
            return f"{float(mantissa):g}e{int(exponent)}"
        return f"{value:.2g}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(short_value(v) for v in value) + "]"
    return str(value)
