"""The MLflow store: its URI, opening and checking it, and closing the runs dead processes left
RUNNING there."""

from __future__ import annotations

import logging
import os
import time
from contextlib import nullcontext
from pathlib import Path

from experiments.core.errors import ExperimentError
from experiments.core.files import check_writable
from experiments.core.interrupts import uninterrupted
from experiments.core.processes import RUN_KEYS, Owner
from experiments.core.secrets import redact
from experiments.tracking import tags as T
from experiments.tracking.checks import check_store, sqlite_path
from experiments.tracking.client import (
    client,
    is_local,
    point_at,
    unreachable_message,
)
from experiments.tracking.outbox import pending_outboxes, sync_outboxes
from experiments.tracking.views import prepare_experiment

log = logging.getLogger("experiments.tracking")


@uninterrupted
def set_tracking(tracking) -> str:
    """Point MLflow at `tracking.uri` and return the id of `tracking.experiment`, creating it;
    records kept for this store by a lost server are sent first, then stale runs closed."""
    uri = str(tracking.uri)
    guard = nullcontext()
    if uri.startswith("sqlite:///"):
        from filelock import FileLock

        database = sqlite_path(uri)
        database.parent.mkdir(parents=True, exist_ok=True)
        # MLflow creates and migrates a new sqlite store without a lock, so processes opening one
        # new store together (a sweep shared by several processes) race on its tables.
        guard = FileLock(f"{database}.lock")
    with guard:
        point_at(uri)
        experiment_id = _experiment_id(client(), tracking, uri, is_local(uri))
        prepare_experiment(experiment_id)
    _settle(uri, tracking.get("outbox_dir"))
    return experiment_id


@uninterrupted
def open_store(uri: str, outbox_dir: str | Path | None = None, *, writes: bool = True) -> None:
    """Point MLflow at `uri`, send what its outboxes under `outbox_dir` kept for it, and close
    the runs that dead processes left RUNNING there. A command that only reads (`writes=False`:
    predict, export) leaves the store as it is, so a read-only copy of one serves it too."""
    from mlflow.exceptions import MlflowException

    check_store(uri, must_exist=True, writes=writes)
    point_at(uri)
    if not writes:
        return
    try:
        _settle(uri, outbox_dir)
    except MlflowException as err:
        raise ExperimentError(unreachable_message(uri, err)) from None


def _settle(uri: str, outbox_dir: str | Path | None) -> None:
    """Send the records a lost server could not take, then close the runs left RUNNING by dead
    processes, except those whose records still wait in an outbox: they are not dead, only
    unsent, and closing them KILLED would contradict what their outbox holds."""
    waiting: dict[str, int] = {}
    if outbox_dir:
        for run_id, _, error in sync_outboxes(Path(str(outbox_dir)), uri):
            if error:
                log.info("records of run %s are still waiting to be sent: %s", run_id, error)
        waiting = pending_outboxes(Path(str(outbox_dir)))
    close_stale_runs(client(), waiting)


def check_tracking(tracking) -> None:
    """One line, before a run exists, unless the store can take a run and the folder its
    artifacts go to can be written (a read-only one would fail the run at its first artifact)."""
    check_store(str(tracking.uri))
    if (root := artifact_root(tracking)) is not None:
        check_writable(root, f"the artifacts of tracking.uri={redact(str(tracking.uri))}")


def artifact_root(tracking) -> Path | None:
    """Where a new experiment keeps artifacts: `tracking.artifact_dir`, else beside an sqlite
    database (`sqlite:////x/mlflow.db` -> `/x/artifacts`), else MLflow's default."""
    if tracking.get("artifact_dir"):
        return Path(str(tracking.artifact_dir))
    uri = str(tracking.uri)
    if uri.startswith("sqlite:///"):
        return sqlite_path(uri).parent / "artifacts"
    return None


def _experiment_id(mlflow_client, tracking, uri: str, local: bool) -> str:
    from mlflow.exceptions import MlflowException

    name = str(tracking.experiment)
    try:
        experiment = mlflow_client.get_experiment_by_name(name)
        if experiment is None:
            root = artifact_root(tracking) if local else None
            location = root.resolve().as_uri() if root else None
            try:
                return mlflow_client.create_experiment(name, artifact_location=location)
            except MlflowException:  # created meanwhile by a concurrent job
                experiment = mlflow_client.get_experiment_by_name(name)
    except MlflowException as err:
        raise ExperimentError(unreachable_message(uri, err)) from None
    if experiment.lifecycle_stage == "deleted":
        raise ExperimentError(
            f"MLflow experiment {name!r} is deleted; restore it in the UI "
            f"(mlflow experiments restore) or set tracking.experiment to another name"
        )
    return experiment.experiment_id


@uninterrupted
def close_stale_runs(mlflow_client, waiting: dict[str, int] | None = None) -> list[str]:
    """Close as KILLED every run left RUNNING on this host by a process that no longer exists,
    except the runs in `waiting` (run id -> records kept in its outbox), which a sync closes;
    and the sweeps, on any host, whose workers all stopped beating."""
    import socket

    host = socket.gethostname()
    experiments = [e.experiment_id for e in mlflow_client.search_experiments()]
    if not experiments:
        return []
    stale = []
    for run in mlflow_client.search_runs(
        experiments, filter_string=f"attributes.status = 'RUNNING' and tags.{T.HOST} = '{host}'"
    ):
        owner = Owner.from_dict(run.data.tags, RUN_KEYS)
        if (owner is None or not owner.alive()) and run.info.run_id not in (waiting or {}):
            stale.append(run)
    close_silent_sweeps(mlflow_client, experiments, waiting or {})
    for run in stale:
        pid = run.data.tags.get(T.PID, "?")
        mlflow_client.set_tag(
            run.info.run_id,
            T.KILLED_REASON,
            f"process {pid} on {host} ended without closing the run (kill -9, out of memory, "
            f"reboot); closed by process {os.getpid()}",
        )
        mlflow_client.set_terminated(run.info.run_id, "KILLED")
        log.warning(
            "run %s was left RUNNING by process %s, which no longer exists: closed as KILLED",
            run.info.run_id,
            pid,
        )
    return [run.info.run_id for run in stale]


def close_silent_sweeps(mlflow_client, experiments: list[str], waiting) -> list[str]:
    """Close the sweep parents, on any host, whose workers all stopped beating for 3 intervals:
    their RUNNING trial runs KILLED, the parent FINISHED when its study has all its trials, else
    KILLED. Runs whose records wait in an outbox (`waiting`) are left to their sync."""
    now = time.time()
    closed = []
    parents = mlflow_client.search_runs(
        experiments, filter_string=f"tags.{T.SWEEP} = 'true' and attributes.status = 'RUNNING'"
    )
    for parent in parents:
        tags = parent.data.tags
        if T.HEARTBEAT not in tags or parent.info.run_id in waiting:
            continue
        silent = now - float(tags[T.HEARTBEAT])
        if silent <= 3 * float(tags.get(T.HEARTBEAT_S, 60)):
            continue
        children = mlflow_client.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.{T.PARENT_RUN} = '{parent.info.run_id}'",
        )
        reason = f"its sweep's workers stopped beating {silent:.0f} s ago (kill -9, a host lost)"
        for child in children:
            if child.info.status == "RUNNING" and child.info.run_id not in waiting:
                mlflow_client.set_tag(child.info.run_id, T.KILLED_REASON, reason)
                mlflow_client.set_terminated(child.info.run_id, "KILLED")
        done = sum(c.data.tags.get(T.OPTUNA_STATE) in ("COMPLETE", "PRUNED") for c in children)
        complete = T.N_TRIALS in tags and done >= int(tags[T.N_TRIALS])
        if not complete:
            mlflow_client.set_tag(parent.info.run_id, T.KILLED_REASON, reason)
        mlflow_client.set_tag(parent.info.run_id, T.JOBS, str(len(children)))
        mlflow_client.set_terminated(parent.info.run_id, "FINISHED" if complete else "KILLED")
        log.warning(
            "sweep parent run %s: %s; closed %s",
            parent.info.run_id,
            reason,
            "FINISHED (its study is complete)" if complete else "KILLED",
        )
        closed.append(parent.info.run_id)
    return closed
