"""The job side of our Optuna sweeper: report each epoch to this job's trial, so it can prune."""

from __future__ import annotations


def trial_callbacks(cfg) -> list:
    """Keras callbacks reporting `optimized_metric` to this job's Optuna trial; [] outside one.

    The sweeper passes `sweeper_trial.{storage,study,number}`; the storage is the channel.
    """
    node = cfg.get("sweeper_trial")
    if not node:
        return []
    import optuna
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate
    from optuna_integration import KerasPruningCallback

    from hydra_plugins.experiments_sweeper.optuna_sweeper import open_storage

    # The job decides whether to prune, so it needs the sweeper's pruner, not Optuna's default.
    pruner = HydraConfig.get().sweeper.get("pruner") if HydraConfig.initialized() else None
    study = optuna.load_study(
        study_name=str(node.study),
        storage=open_storage(str(node.storage)),
        pruner=instantiate(pruner) if pruner else optuna.pruners.NopPruner(),
    )
    (frozen,) = [t for t in study.get_trials(deepcopy=False) if t.number == int(node.number)]
    # optuna.trial.Trial is how a worker attaches to a trial another process asked for; Optuna
    # addresses it by its storage id.
    trial = optuna.trial.Trial(study, frozen._trial_id)
    return [KerasPruningCallback(trial, monitor=str(cfg.optimized_metric))]


def trial_tags(cfg) -> dict[str, str]:
    """MLflow tags naming the study and trial of this job, if it runs one."""
    node = cfg.get("sweeper_trial")
    if not node:
        return {}
    return {"optuna_study": str(node.study), "optuna_trial": str(node.number)}
