"""The active run: opened new or resumed, its metrics, tags and artifacts, and how it ends.

Every write goes through the run's outbox (`tracking.outbox`), so a lost tracking server loses
nothing.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from experiments.core.errors import ExperimentError
from experiments.core.interrupts import deferred, raise_if_pending, uninterrupted
from experiments.core.processes import RUN_KEYS, memory_metrics, this_process
from experiments.core.secrets import redact
from experiments.tracking import tags as T
from experiments.tracking.client import client
from experiments.tracking.outbox import Outbox
from experiments.tracking.store import set_tracking
from experiments.tracking.sweeps import parent_of_job, sweep_tags
from experiments.tracking.system import PREFIX as SYSTEM_PREFIX
from experiments.tracking.system import SystemSampler

log = logging.getLogger("experiments.tracking")


@dataclass
class ActiveRun:
    """The run being recorded: its id, whether it was resumed, and its outbox."""

    run_id: str
    resumed: bool
    outbox: Outbox
    last_step: int = 0  # of the epoch metrics logged so far
    system: SystemSampler | None = None  # its system metrics, unless tracking.system_metrics=false


_active: dict[str, ActiveRun] = {}


@contextmanager
def start_run(
    tracking,
    run_name: str,
    tags: dict[str, str],
    identity: str | None = None,
    resume: str = "never",
) -> Iterator[ActiveRun]:
    """An active MLflow run that always ends: FINISHED, FAILED, or KILLED on a signal.

    With `resume` `auto`, an interrupted run (KILLED or FAILED) of the same `identity` is
    continued instead of a new one; a run id continues that run. A run stopped by an Optuna
    pruner ends FINISHED with the tag `pruned`, its curves kept. Inside a multirun the run nests
    under the sweep's parent run. Calls a lost tracking server cannot take wait in the outbox.
    """
    # A signal while the run is opened or closed waits for it (see experiments.core.interrupts).
    enclosing = _active.get("run")  # a group's parent, active around its members' runs
    if enclosing is None:
        _active.pop("cut", None)
    with deferred(hold=True):
        active = _open_run(tracking, run_name, tags, identity, resume)
        _active["run"] = active
    try:
        raise_if_pending()
        yield active
    except BaseException as err:
        with deferred(hold=True):
            log_memory()
            log_system_metrics(last=True)
            _end_run(*_ending(err))
        _active.setdefault("cut", active)  # the innermost: a group's member, not its parent
        raise
    else:
        with deferred():  # a signal now ends the process after the run is FINISHED
            log_memory()
            log_system_metrics(last=True)
            _end_run("FINISHED")
    finally:
        _active.pop("run", None)
        if enclosing is not None:
            _active["run"] = enclosing
        _active["last"] = active
        active.outbox.report()


def _open_run(tracking, run_name: str, tags: dict, identity: str | None, resume: str):
    """Start a new MLflow run, or continue the interrupted one `resume` finds."""
    import mlflow

    experiment_id = set_tracking(tracking)
    parent_experiment, parent = parent_of_job()
    # Children live in their parent's experiment, or the UI cannot nest them.
    experiment_id = parent_experiment or experiment_id
    resumed = resumable_run(experiment_id, identity, resume) if identity else None
    owner = {k: str(v) for k, v in this_process().to_dict(RUN_KEYS).items()}
    tags = tags | owner | ({T.IDENTITY: identity} if identity else {}) | sweep_tags()
    tags = {key: redact(str(value)) for key, value in tags.items()}  # `command` among them
    nested = mlflow.active_run() is not None  # a group member, inside its parent
    if resumed:
        run = mlflow.start_run(run_id=resumed, nested=nested)
        client().log_batch(
            resumed, tags=T.as_run_tags(tags | {T.RESUMED: "true"} | _history(resumed))
        )
        log.info("resuming run %s (resume=%s)", resumed, resume)
    else:
        run = mlflow.start_run(
            experiment_id=experiment_id,
            run_name=run_name,
            parent_run_id=parent,
            tags=tags,
            nested=nested,
        )
    outbox = Outbox(Path(str(tracking.outbox_dir)), run.info.run_id, str(tracking.uri))
    system = None
    if tracking.get("system_metrics", True):
        first = _next_system_step(run.info.run_id) if resumed else 0
        system = SystemSampler(float(tracking.get("system_metrics_interval_s", 10)), first)
    return ActiveRun(run.info.run_id, bool(resumed), outbox, system=system)


def _history(run_id: str) -> dict[str, str]:
    """What stopped a run that now resumes, moved from `stopped_by` and `killed_reason` (which
    would say of a run that goes on to finish that it was stopped) to `resumed_after`, which
    keeps each interruption, oldest first."""
    mlflow_client = client()
    tags = mlflow_client.get_run(run_id).data.tags
    why = [f"{key}={tags[key]}" for key in (T.STOPPED_BY, T.KILLED_REASON) if key in tags]
    if not why:
        return {}
    for key in (T.STOPPED_BY, T.KILLED_REASON):
        if key in tags:
            mlflow_client.delete_tag(run_id, key)
    earlier = tags.get(T.RESUMED_AFTER)
    return {T.RESUMED_AFTER: "; ".join([*([earlier] if earlier else []), ", ".join(why)])}


def _next_system_step(run_id: str) -> int:
    """The step after the last system metric a resumed run holds."""
    history = client().get_metric_history(run_id, f"{SYSTEM_PREFIX}cpu_utilization_percentage")
    return max((m.step for m in history), default=-1) + 1


def _ending(err: BaseException) -> tuple[str, dict[str, str]]:
    """The status a run ends with after `err`, and the tag that says why."""
    name = type(err).__name__
    if name == "TrialPruned":
        return "FINISHED", {T.PRUNED: "true"}
    if name in ("Interrupted", "KeyboardInterrupt"):
        return "KILLED", {T.STOPPED_BY: getattr(err, "name", "SIGINT")}
    return "FAILED", {T.ERROR: f"{name}: {err}"}


def _end_run(status: str, tags: dict[str, str] | None = None) -> None:
    """End the active run with `status`, after every call kept in its outbox."""
    import mlflow

    if tags:
        set_tags(tags)
    active = _active["run"]
    # mlflow.end_run() would call the server at once, ahead of the kept calls; the status goes
    # through the outbox instead, and the fluent API only forgets the run (its private stack).
    stack = mlflow.tracking.fluent._active_run_stack.get()
    if stack and stack[-1].info.run_id == active.run_id:
        stack.pop()
    os.environ.pop("MLFLOW_RUN_ID", None)
    active.outbox.call("end", {"status": status, "end_time": _now_ms()})


def active_run() -> ActiveRun | None:
    return _active.get("run")


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Log metrics to the active run, or keep them in its outbox while the server is lost."""
    active = _active.get("run")
    if active is None:
        return
    if step is not None:
        active.last_step = max(active.last_step, step)
    payload = {"metrics": {k: float(v) for k, v in metrics.items()}, "step": step or 0}
    active.outbox.call("metrics", payload | {"timestamp": _now_ms()})


def log_system_metrics(last: bool = False) -> None:
    """Log the system metrics sampled since the last call (the `last` call stops sampling)."""
    active = _active.get("run")
    if active is None or active.system is None:
        return
    if last:
        active.system.stop()
    for timestamp, step, metrics in active.system.drain():
        active.outbox.call("metrics", {"metrics": metrics, "step": step, "timestamp": timestamp})


def log_params(params: dict[str, str]) -> None:
    """Log params to the active run (through its outbox), without passwords (`core.secrets`):
    the outbox keeps what it cannot send yet on disk."""
    active = _active.get("run")
    if active is not None and params:
        values = {k: redact(str(v)) for k, v in params.items()}
        active.outbox.call("params", {"params": values})


def set_tags(tags: dict[str, str]) -> None:
    """Set tags on the active run (through its outbox), without passwords."""
    active = _active.get("run")
    if active is not None:
        values = {k: redact(str(v))[: T.MAX_VALUE_CHARS] for k, v in tags.items()}
        active.outbox.call("tags", {"tags": values})


def log_artifact(path: Path, artifact_path: str | None = None) -> None:
    """Log a file or a folder to the active run (through its outbox)."""
    active = _active.get("run")
    if active is not None:
        active.outbox.call("artifact", {"artifact_path": artifact_path}, files=[Path(path)])


def log_text(text: str, artifact_file: str) -> None:
    """Log `text` as the file `artifact_file` of the active run (through its outbox), without
    passwords (a config, a command)."""
    folder, _, name = artifact_file.rpartition("/")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(redact(text))
        log_artifact(path, folder or None)


def log_datasets(datasets: dict[str, object]) -> None:
    """Log MLflow datasets as the active run's inputs, each with its context (e.g. the split)."""
    active = _active.get("run")
    if active is not None:
        items = [{"dataset": d.to_dict(), "context": c} for c, d in datasets.items()]
        active.outbox.call("inputs", {"datasets": items})


def log_memory() -> None:
    """The process's peak and current resident memory as the run ends, for every ending.

    Trials of a sweep share one process, so `peak_rss_mb` growing from trial to trial is a leak;
    `python -m experiments.benchmark` reads these. Logged at the last epoch's step, so that a
    run that is interrupted and resumed keeps one value per ending.
    """
    active = _active.get("run")
    log_metrics(memory_metrics(), step=active.last_step if active else None)


@uninterrupted
def backfill_metrics(records: list[dict]) -> int:
    """Log the epochs of `records` that the active run lacks (a kill between the epoch's backup
    and its logging); the number of epochs logged."""
    active = _active["run"]
    logged = {m.step for m in client().get_metric_history(active.run_id, "loss")}
    missing = [r for r in records if r["epoch"] not in logged]
    for record in missing:
        log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=record["epoch"])
    return len(missing)


def _now_ms() -> int:
    return int(time.time() * 1000)


def logged_params(run_id: str) -> dict[str, str]:
    """The params a run holds already."""
    return client().get_run(run_id).data.params


def recorded(run_id: str) -> set[str]:
    """What a run already holds of its opening records: 'config' (the last of its params was
    logged) and 'task' (its data lineage)."""
    mlflow_client = client()
    data = mlflow_client.get_run(run_id).data
    found = set()
    if "config/overrides.yaml" in {a.path for a in mlflow_client.list_artifacts(run_id, "config")}:
        found.add("config")
    if T.CLASS_NAMES in data.tags:
        found.add("task")
    return found


def run_status(run_id: str) -> str | None:
    """The status of a run, or None when the store cannot tell."""
    try:
        return client().get_run(run_id).info.status
    except Exception:  # a lost server: the caller says what it knows without it
        return None


def last_run_id() -> str | None:
    """The id of the run this process recorded last, if any: after an interruption, the
    innermost run it cut (a group's member, which is what resumes)."""
    last = _active.get("run") or _active.get("cut") or _active.get("last")
    return last.run_id if last else None


def resumable_run(experiment_id: str, identity: str, resume: str) -> str | None:
    """The id of the run to continue: the newest interrupted run of `identity` for `auto`,
    the named run for a run id, or None (a new run)."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client()
    if resume == "never":
        return None
    if resume != "auto":
        try:
            run = mlflow_client.get_run(resume)
        except MlflowException:
            raise ExperimentError(
                f"resume={resume}: no such run in {mlflow_client.tracking_uri}; list the runs "
                f"that can be resumed with: python -m experiments.runs"
            ) from None
        if run.info.status == "FINISHED":
            raise ExperimentError(
                f"resume={resume}: that run is FINISHED and is never resumed; drop resume= to "
                f"start a new run"
            )
        if run.data.tags.get(T.IDENTITY) != identity:
            raise ExperimentError(
                f"resume={resume}: that run was started with another config; rerun its own "
                f"command (see its tag `command`) with resume={resume}"
            )
        return resume
    runs = mlflow_client.search_runs(
        [experiment_id],
        filter_string=f"tags.{T.IDENTITY} = '{identity}'",
        order_by=["attributes.start_time DESC"],
    )
    for run in runs:
        if run.info.status in ("KILLED", "FAILED"):
            return run.info.run_id
        if run.info.status == "FINISHED":
            return None  # a finished run is never resumed: the same command starts a new one
    return None
