"""The names of the tags the project writes on MLflow runs and reads back.

One place, so that the code that writes a tag and the code that reads it (resume, the stale-run
check, `experiments.runs`, `experiments.compare`, the sweeper) cannot drift apart.
"""

from __future__ import annotations

from experiments.core.processes import RUN_KEYS

# MLflow caps a param or tag value at 6,000 characters; longer ones are cut there.
MAX_VALUE_CHARS = 6000

# What a run is
IDENTITY = "identity"  # a digest of the resolved config minus where it writes: resume finds it
RUN_TYPE = "run_type"  # "evaluate" or "benchmark": not a training run
TASK = "task"
BACKBONE = "backbone"
STRATEGY = "strategy"
AUGMENTATION = "augmentation"
AUGMENTATION_APPLIED = "augmentation_applied"  # false for two_stage, which trains without it
FEATURE_CACHE = "feature_cache"  # two_stage: hit or miss
CLASS_NAMES = "class_names"  # set last with the data lineage: a resumed run checks it is whole
COMMAND = "command"
RUN_NAME = "mlflow.runName"
NOTE = "mlflow.note.content"  # the description the UI shows on a run's page
PARENT_RUN = "mlflow.parentRunId"

# Who runs it: a run left RUNNING by a process that is gone is closed KILLED
HOST, PID, PID_STARTED = RUN_KEYS

# How it ended
RESUMED = "resumed"
STOPPED_BY = "stopped_by"  # the signal, or stale_trial
KILLED_REASON = "killed_reason"  # closed by another process: its owner was gone
RESUMED_AFTER = "resumed_after"  # a resumed run's earlier stops (stopped_by=..., killed_reason=...)
ERROR = "error"
PRUNED = "pruned"
RETURNED_VALUE = "returned_value"  # what the job returned to its sweeper (JSON)
# How time_compile_s was had: "measured" (JAX's compile events) or "estimated" (first epochs).
COMPILE_TIME = "time_compile_source"

# Sweeps: the parent run of a multirun and its jobs
SWEEP = "sweep"  # "true" on a multirun's parent run
SWEEP_IDENTITY = "sweep_identity"  # a digest of the multirun's defining overrides and study
SWEEP_STUDY = "sweep_study"  # an Optuna sweep's study: "NAME in STORAGE"
SWEEP_DIR = "sweep_dir"
SWEEP_OVERRIDES = "sweep_overrides"
SWEEPER = "sweeper"
JOBS = "jobs"
HEARTBEAT = "heartbeat"  # unix seconds of the last beat of a process working on the sweep
HEARTBEAT_S = "heartbeat_s"  # how often it beats
N_TRIALS = "n_trials"  # the trials an Optuna sweep's study needs
SWEPT = "swept_params"  # the config keys a job was given by its sweep, comma-separated

# Groups: one config run with several seeds (trainer.repeats) or folds (task.folds)
GROUP = "group"  # "true" on a group's parent run
SEEDS = "seeds"  # the group's seeds, comma-separated
REPEATS = "repeats"
FOLDS = "folds"
MEMBERS = "members"  # how many runs the group's aggregate holds

# Optuna: a trial's run, and the study on its parent run
OPTUNA_STUDY = "optuna_study"
OPTUNA_TRIAL = "optuna_trial"
OPTUNA_STATE = "optuna_state"
OPTUNA_DIRECTIONS = "optuna_directions"
OPTIMIZED_METRIC = "optimized_metric"
BEST_TRIAL = "best_trial"
WARM_START = "warm_start"  # where a study's warm start came from (parent), or a trial's (child)
WARM_START_TRIALS = "warm_start_trials"  # how many finished trials it brought (parent)
PARETO = "pareto"


def as_run_tags(tags: dict[str, object]) -> list:
    """MLflow RunTag entities of `tags`, each value without passwords (`core.secrets`) and cut
    to MLflow's limit. Every tag the project sets goes through here."""
    from mlflow.entities import RunTag

    from experiments.core.secrets import redact

    return [RunTag(k, redact(str(v))[:MAX_VALUE_CHARS]) for k, v in tags.items()]
