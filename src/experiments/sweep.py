"""The job side of our Optuna sweeper: which trial this job runs, and its epochs reported to it.

The sweeper sets the storage, the study and the trial number in the job's environment (through
`hydra.job.env_set`, not task overrides); the storage is the channel between the two.
"""

from __future__ import annotations

import os

STORAGE_ENV = "EXPERIMENTS_OPTUNA_STORAGE"
STUDY_ENV = "EXPERIMENTS_OPTUNA_STUDY"
TRIAL_ENV = "EXPERIMENTS_OPTUNA_TRIAL"


def defining_overrides(overrides) -> list[str]:
    """A sweep's overrides that define its jobs, sorted: all but where a machine writes
    (`paths.*`), where it records (`tracking.*`) and how it resumes (`resume=`), which differ
    between the machines that share one study and between a run and its resumption."""
    return sorted(
        o for o in overrides if not o.lstrip("+~").startswith(("paths.", "tracking.", "resume="))
    )


def this_trial() -> tuple[str, str, int] | None:
    """(storage, study, trial number) when this job runs an Optuna trial, else None."""
    if TRIAL_ENV not in os.environ:
        return None
    return os.environ[STORAGE_ENV], os.environ[STUDY_ENV], int(os.environ[TRIAL_ENV])


def trial_callbacks(cfg) -> list:
    """Keras callbacks reporting `optimized_metric` to this job's Optuna trial; [] outside one,
    and for a multi-objective study, which Optuna cannot prune."""
    trial_of_job = this_trial()
    if trial_of_job is None:
        return []
    import optuna
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate
    from optuna_integration import KerasPruningCallback

    from experiments.studies import open_storage

    storage, name, number = trial_of_job
    # The job decides whether to prune, so it needs the sweeper's pruner, not Optuna's default.
    pruner = HydraConfig.get().sweeper.get("pruner") if HydraConfig.initialized() else None
    study = optuna.load_study(
        study_name=name,
        storage=open_storage(storage),
        pruner=instantiate(pruner) if pruner else optuna.pruners.NopPruner(),
    )
    if len(study.directions) > 1:
        return []
    (frozen,) = [t for t in study.get_trials(deepcopy=False) if t.number == number]
    # optuna.trial.Trial is how a worker attaches to a trial another process asked for; Optuna
    # addresses it by its storage id.
    trial = optuna.trial.Trial(study, frozen._trial_id)
    return [KerasPruningCallback(trial, monitor=str(cfg.optimized_metric))]


def trial_tags() -> dict[str, str]:
    """MLflow tags naming the study and trial of this job, if it runs one."""
    trial_of_job = this_trial()
    if trial_of_job is None:
        return {}
    from experiments.tracking import tags as T

    _, name, number = trial_of_job
    return {T.OPTUNA_STUDY: name, T.OPTUNA_TRIAL: str(number)}
