"""The tracking group: the only code that talks to MLflow.

Runs with params, tags, data lineage, metrics, artifacts and models; the sweep's parent run and
its study; and reading the store back. One module per concern:

| module | holds |
| --- | --- |
| `client` | the MLflow client of a URI; what a lost server looks like |
| `checks` | what is wrong with a store, found in seconds: down, missing, read-only, locked |
| `store` | opening the store: pending outboxes sent, runs of dead processes closed |
| `outbox` | records waiting for a lost server, and sending them |
| `runs` | the active run: start, resume, metrics, tags, artifacts, its end |
| `records` | what a run records about itself: config, tags, data lineage, the model |
| `sweeps` | the parent run of a multirun, the Optuna study's record |
| `queries` | reading the store: runs as rows or a table, histories, models, per-image predictions |
| `system` | a run's system metrics, sampled by MLflow's monitors |
| `views` | how MLflow's UI opens an experiment: model training, the comparison view |
| `registry` | the model registry: versions, aliases, a model URI's source run |
| `serving` | the logged model's pyfunc flavor (class names and probabilities) and its server |
| `tags` | the names of every tag the project writes or reads |

MLflow is imported inside the functions, so composing a config never pays for it.
"""

from experiments.core.processes import GROUP_PARENT_ENV, memory_metrics
from experiments.tracking import registry, serving, tags
from experiments.tracking.checks import check_store, sqlite_path
from experiments.tracking.client import HTTP_DEFAULTS, sqlite_uri
from experiments.tracking.outbox import Outbox, flush_outbox, pending_outboxes, sync_outboxes
from experiments.tracking.queries import (
    Predictions,
    RunRow,
    experiments,
    find_run,
    finished_member,
    load_text,
    metric_history,
    predictions,
    run_rows,
    runs_table,
)
from experiments.tracking.records import (
    flatten,
    git_state,
    log_config,
    log_model,
    log_task,
    run_tags,
    serving_requirements,
)
from experiments.tracking.registry import load_model
from experiments.tracking.runs import (
    ActiveRun,
    backfill_metrics,
    last_run_id,
    log_artifact,
    log_memory,
    log_metrics,
    log_params,
    log_system_metrics,
    log_text,
    recorded,
    resumable_run,
    run_status,
    set_tags,
    start_run,
)
from experiments.tracking.store import (
    artifact_root,
    check_tracking,
    close_stale_runs,
    open_store,
    set_tracking,
)
from experiments.tracking.sweeps import (
    PARENT_RUN_ENV,
    SWEEP_IDENTITY_ENV,
    MlflowSweepCallback,
    end_stale_trial_runs,
    finished_sweep_job,
    log_study,
    sweep_identity,
    tag_sweep_parent,
    tag_trial_runs,
)
from experiments.tracking.views import experiment_link, prepare_experiment, ui_command
from experiments.tracking.warm_start import finished_results

__all__ = [
    "HTTP_DEFAULTS",
    "PARENT_RUN_ENV",
    "SWEEP_IDENTITY_ENV",
    "GROUP_PARENT_ENV",
    "ActiveRun",
    "MlflowSweepCallback",
    "Outbox",
    "Predictions",
    "RunRow",
    "artifact_root",
    "backfill_metrics",
    "check_store",
    "check_tracking",
    "close_stale_runs",
    "end_stale_trial_runs",
    "experiment_link",
    "experiments",
    "find_run",
    "finished_member",
    "finished_results",
    "finished_sweep_job",
    "flatten",
    "flush_outbox",
    "git_state",
    "last_run_id",
    "load_model",
    "load_text",
    "log_artifact",
    "log_config",
    "log_memory",
    "log_metrics",
    "log_model",
    "log_params",
    "log_study",
    "log_system_metrics",
    "log_task",
    "log_text",
    "memory_metrics",
    "metric_history",
    "open_store",
    "pending_outboxes",
    "predictions",
    "prepare_experiment",
    "recorded",
    "registry",
    "resumable_run",
    "run_rows",
    "run_status",
    "run_tags",
    "runs_table",
    "serving",
    "serving_requirements",
    "set_tags",
    "set_tracking",
    "start_run",
    "sweep_identity",
    "sqlite_path",
    "sqlite_uri",
    "sync_outboxes",
    "tag_sweep_parent",
    "tag_trial_runs",
    "tags",
    "ui_command",
]
