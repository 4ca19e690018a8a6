"""The parent run of a multirun, and the Optuna study's record on it and on its trials' runs."""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from experiments.core.interrupts import uninterrupted
from experiments.core.job import SWEEP_OVERRIDES_ENV, defining_overrides, sweep_keys
from experiments.core.processes import GROUP_PARENT_ENV, RUN_KEYS, this_process
from experiments.core.secrets import redact
from experiments.tracking import tags as T
from experiments.tracking.client import client
from experiments.tracking.outbox import STALE_TRIAL
from experiments.tracking.queries import RunRow, run_rows
from experiments.tracking.store import set_tracking
from experiments.tracking.views import prepare_experiment

log = logging.getLogger("experiments.tracking")

# A multirun's parent run id, set by MlflowSweepCallback for the jobs it launches.
PARENT_RUN_ENV = "EXPERIMENTS_MLFLOW_PARENT_RUN_ID"
# The sweep a job belongs to (a digest of the multirun's overrides), set by MlflowSweepCallback.
SWEEP_IDENTITY_ENV = "EXPERIMENTS_SWEEP_IDENTITY"
# Parent run id -> the event that stops its heartbeat. Kept here, not on the callback, which a
# launcher such as joblib pickles with the sweep's context (an Event cannot be pickled).
_beating: dict[str, threading.Event] = {}


def sweep_identity(overrides: list[str], study: str | None = None) -> str:
    """A digest of a multirun's overrides, minus where it writes and how it resumes, and of its
    Optuna study (`sweep_study`) if it has one: two studies with the same overrides are two
    sweeps, whose trial numbers, parents and finished jobs never mix."""
    key = defining_overrides(overrides) + ([f"study={study}"] if study else [])
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:24]


def sweep_study(config: DictConfig) -> str | None:
    """An Optuna sweep's study as `NAME in STORAGE` (its password as ***; the default journal
    is the sweep dir's), or None for a sweeper without studies (Hydra's basic one)."""
    name = OmegaConf.select(config, "hydra.sweeper.study_name", default=None)
    if name is None:
        return None
    storage = OmegaConf.select(config, "hydra.sweeper.storage", default=None)
    storage = storage or f"journal:{Path(config.hydra.sweep.dir) / 'optuna.journal'}"
    return f"{name} in {redact(str(storage))}"


def sweep_parent(mlflow_client, experiment_id: str, identity: str) -> str | None:
    """The parent run that all workers of a sweep share: of the RUNNING parents of this sweep
    identity, the first opened (then the smallest id), so that every worker picks the same."""
    runs = mlflow_client.search_runs(
        [experiment_id],
        filter_string=(
            f"tags.{T.SWEEP_IDENTITY} = '{identity}' and tags.{T.SWEEP} = 'true' "
            "and attributes.status = 'RUNNING'"
        ),
    )
    if not runs:
        return None
    return min(runs, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id


def parent_of_job() -> tuple[str | None, str | None]:
    """(the experiment id, the parent run id) a run nests under: its group's parent run while a
    group (repeats, folds) runs its members, else its multirun's, else (None, None).

    Workers of a multirun that started together may each have opened a parent: all use the one
    `sweep_parent` picks.
    """
    mlflow_client = client()
    if group := os.environ.get(GROUP_PARENT_ENV):
        return mlflow_client.get_run(group).info.experiment_id, group
    parent = os.environ.get(PARENT_RUN_ENV) or None
    if not parent:
        return None, None
    experiment_id = mlflow_client.get_run(parent).info.experiment_id
    if sweep := os.environ.get(SWEEP_IDENTITY_ENV):
        parent = sweep_parent(mlflow_client, experiment_id, sweep) or parent
        os.environ[PARENT_RUN_ENV] = parent
    return experiment_id, parent


def sweep_tags() -> dict[str, str]:
    """The tag naming the sweep this job belongs to, if any."""
    sweep = os.environ.get(SWEEP_IDENTITY_ENV)
    return {T.SWEEP_IDENTITY: sweep} if sweep else {}


def finished_sweep_job(identity: str) -> RunRow | None:
    """The FINISHED run of this config in a sweep of the same overrides, or None."""
    sweep = os.environ.get(SWEEP_IDENTITY_ENV)
    if not sweep:
        return None
    runs = run_rows(
        f"tags.{T.IDENTITY} = '{identity}' and tags.{T.SWEEP_IDENTITY} = '{sweep}' "
        f"and attributes.status = 'FINISHED'"
    )
    return runs[0] if runs else None


class MlflowSweepCallback(Callback):
    """Opens one MLflow parent run per multirun; every job of the sweep nests under it.

    The same multirun command run again after an interruption continues its parent run (with
    `resume=auto`), and its jobs skip what already finished and resume what was interrupted.
    """

    def __init__(self) -> None:
        self.run_id: str | None = None
        self.swept: list[str] = []  # the config keys the sweep varies
        self.metric = None  # its optimized_metric

    @uninterrupted
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        experiment_id = set_tracking(config.tracking)
        hydra_cfg = config.hydra
        overrides = list(hydra_cfg.overrides.task)
        study = sweep_study(config)
        identity = sweep_identity(overrides, study)
        self.swept = sweep_keys(overrides, OmegaConf.select(config, "hydra.sweeper.params"))
        self.metric = config.get("optimized_metric")
        mlflow_client = client()
        earlier = (
            mlflow_client.search_runs(
                [experiment_id],
                filter_string=f"tags.{T.SWEEP_IDENTITY} = '{identity}' and tags.{T.SWEEP} = 'true'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            if str(config.get("resume", "auto")) != "never"
            else []
        )
        if earlier and earlier[0].info.status in ("KILLED", "FAILED"):
            self.run_id = earlier[0].info.run_id
            mlflow_client.update_run(self.run_id, status="RUNNING")
            owner = this_process().to_dict(RUN_KEYS)
            mlflow_client.log_batch(self.run_id, tags=T.as_run_tags(owner | {T.RESUMED: "true"}))
            log.info("continuing the interrupted sweep's parent run %s", self.run_id)
        elif earlier and earlier[0].info.status == "RUNNING":
            # The same command on another machine (or beside this one) works on a shared study:
            # one parent for all its workers. A parent left RUNNING by a dead process on this
            # host was closed KILLED when the store was opened, and is continued above.
            self.run_id = earlier[0].info.run_id
            log.info("joining the sweep's parent run %s, which another process runs", self.run_id)
        else:
            self.run_id = self._open(
                mlflow_client, experiment_id, hydra_cfg, overrides, identity, study
            )
            swept = ", ".join(key.rsplit(".", 1)[-1] for key in self.swept) or "nothing"
            name = f"sweep {Path(hydra_cfg.sweep.dir).name}: {swept}"
            mlflow_client.set_tag(self.run_id, T.RUN_NAME, name)
        os.environ[PARENT_RUN_ENV] = self.run_id
        os.environ[SWEEP_IDENTITY_ENV] = identity
        os.environ[SWEEP_OVERRIDES_ENV] = json.dumps(overrides)
        prepare_experiment(experiment_id, self.swept)
        self._beat(mlflow_client, config)
        # A sweep that dies before on_multirun_end still closes its parent run.
        atexit.register(self.close, None)

    def _beat(self, mlflow_client, config: DictConfig) -> None:
        """Mark the parent alive now and every `tracking.heartbeat_s` until it is closed: a
        parent whose every worker is gone (kill -9 on another host) is found by any later
        command (store.close_stale_runs) and closed."""
        interval = float(config.tracking.get("heartbeat_s") or 60)
        n_trials = OmegaConf.select(config, "hydra.sweeper.n_trials")
        tags = {T.HEARTBEAT_S: f"{interval:g}", T.SWEPT: ",".join(self.swept)}
        tags |= {T.N_TRIALS: str(n_trials)} if n_trials else {}
        mlflow_client.log_batch(self.run_id, tags=T.as_run_tags(tags))
        _beating[self.run_id] = beat_while_running(mlflow_client, self.run_id, interval)

    @staticmethod
    def _open(mlflow_client, experiment_id, hydra_cfg, overrides, identity, study) -> str:
        """A new parent run, or the one another worker opened at the same moment."""
        sweeper = hydra_cfg.sweeper.get("_target_", "basic").rsplit(".", 1)[-1]
        tags = {
            **({T.SWEEP_STUDY: study} if study else {}),
            T.SWEEP: "true",
            T.SWEEP_DIR: str(hydra_cfg.sweep.dir),
            T.SWEEP_OVERRIDES: " ".join(overrides)[: T.MAX_VALUE_CHARS],
            T.SWEEP_IDENTITY: identity,
            T.SWEEPER: sweeper,
            **{k: str(v) for k, v in this_process().to_dict(RUN_KEYS).items()},
        }
        run = mlflow_client.create_run(
            experiment_id,
            run_name=f"sweep-{Path(hydra_cfg.sweep.dir).name}",
            tags={key: redact(value) for key, value in tags.items()},
        )
        chosen = sweep_parent(mlflow_client, experiment_id, identity)
        if chosen and chosen != run.info.run_id:
            mlflow_client.delete_run(run.info.run_id)
            log.info("joining the sweep's parent run %s, opened by another process", chosen)
            return chosen
        log.info("MLflow parent run %s for this sweep", run.info.run_id)
        return run.info.run_id

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.close("FINISHED")

    @uninterrupted
    def close(self, status: str | None) -> None:
        """End the parent run: `status`, or at exit KILLED after a signal and FAILED otherwise."""
        if self.run_id is None:
            return
        from experiments.core import interrupts

        if (beating := _beating.pop(self.run_id, None)) is not None:
            beating.set()
        if status is None:
            status = "KILLED" if interrupts.received() else "FAILED"
        # The one its jobs chose, if workers that started together opened several (start_run).
        self.run_id = os.environ.get(PARENT_RUN_ENV) or self.run_id
        mlflow_client = client()
        children = mlflow_client.search_runs(
            [mlflow_client.get_run(self.run_id).info.experiment_id],
            filter_string=f"tags.{T.PARENT_RUN} = '{self.run_id}'",
        )
        mlflow_client.set_tag(self.run_id, T.JOBS, str(len(children)))
        if children:
            parent = mlflow_client.get_run(self.run_id)
            mlflow_client.set_tag(self.run_id, T.NOTE, sweep_note(parent, children, self.metric))
        if any(c.info.status == "RUNNING" for c in children):
            # Another worker of a shared study is still running a trial: it closes the parent.
            log.info("parent run %s left RUNNING for the other workers of this sweep", self.run_id)
        else:
            mlflow_client.set_terminated(self.run_id, status)
        if status == "FINISHED" and not children:
            # Nothing ran (e.g. a complete study resumed): the run the study did run holds it all.
            mlflow_client.delete_run(self.run_id)
            log.info("no job ran; deleted the empty parent run %s", self.run_id)
        for variable in (PARENT_RUN_ENV, SWEEP_IDENTITY_ENV, SWEEP_OVERRIDES_ENV):
            os.environ.pop(variable, None)
        self.run_id = None


def sweep_note(parent, children, metric) -> str:
    """The parent run's description (MLflow's note, in Markdown): what the sweep ran and its
    best run, or its Pareto front."""
    tags = parent.data.tags
    states = {}
    for child in children:
        state = "pruned" if child.data.tags.get(T.PRUNED) == "true" else child.info.status
        states[state.lower()] = states.get(state.lower(), 0) + 1
    overrides = " ".join(defining_overrides(tags.get(T.SWEEP_OVERRIDES, "").split()))
    lines = [
        f"**Sweep** `{overrides}` ({tags.get(T.SWEEPER, '')}): "
        f"{len(children)} runs, " + ", ".join(f"{n} {s}" for s, n in sorted(states.items())),
    ]
    metric = tags.get(T.OPTIMIZED_METRIC) or (metric if isinstance(metric, str) else None)
    directions = tags.get(T.OPTUNA_DIRECTIONS, "")
    if "," in directions:
        front = [c.info.run_name for c in children if c.data.tags.get(T.PARETO) == "true"]
        lines.append(
            f"**Pareto front** of {metric} ({directions}): {'; '.join(front) or 'none yet'} "
            "(`study/pareto_front.json`)"
        )
        return "\n\n".join(lines)
    scored = [(_returned(c), c) for c in children if c.info.status == "FINISHED"]
    scored = [(value, c) for value, c in scored if value is not None]
    if metric and scored:
        lowest = directions == "minimize" or (not directions and "loss" in metric)
        value, best = (min if lowest else max)(scored, key=lambda pair: pair[0])
        test = best.data.metrics.get("test_accuracy")
        lines.append(
            f"**Best**: {best.info.run_name} (run `{best.info.run_id}`): {metric} = {value:.4g}"
            + (f", test_accuracy = {test:.4g}" if test is not None else "")
        )
    return "\n\n".join(lines)


def _returned(run) -> float | None:
    """The single value a job returned to its sweeper, if it returned one."""
    try:
        value = json.loads(run.data.tags.get(T.RETURNED_VALUE, "null"))
    except ValueError:
        return None
    return float(value) if isinstance(value, int | float) else None


def beat_while_running(mlflow_client, run_id: str, interval: float) -> threading.Event:
    """Set the run's heartbeat tag now and every `interval` seconds, in a daemon thread, until
    the event returned is set. A beat the server does not take is skipped, not fatal."""
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                mlflow_client.set_tag(run_id, T.HEARTBEAT, f"{time.time():.0f}")
            except Exception as err:  # a lost server: the next beat tries again
                log.debug("heartbeat of run %s not recorded: %s", run_id, err)
            if stop.wait(interval):
                return

    beat_now = threading.Thread(target=beat, name="sweep-heartbeat", daemon=True)
    beat_now.start()
    return stop


def _study_runs(study_name: str, extra_filter: str = ""):
    """(client, the runs of a study's trials in the sweep's experiment), or (None, [])."""
    parent = os.environ.get(PARENT_RUN_ENV)
    if not parent:
        return None, []
    mlflow_client = client()
    experiment = mlflow_client.get_run(parent).info.experiment_id
    wanted = f"tags.{T.OPTUNA_STUDY} = '{study_name}'" + (
        f" and {extra_filter}" if extra_filter else ""
    )
    return mlflow_client, mlflow_client.search_runs(
        [experiment], filter_string=wanted, max_results=50000
    )


def tag_sweep_parent(tags: dict[str, object]) -> None:
    """Tag the multirun's parent run, where there is one (an Optuna sweep of experiments.train)."""
    parent = os.environ.get(PARENT_RUN_ENV)
    if parent:
        client().log_batch(parent, tags=T.as_run_tags(tags))


def tag_trial_runs(study_name: str, tags: dict[int, dict[str, str]]) -> None:
    """Tag the MLflow runs of a study's trials, by trial number, in the sweep's experiment."""
    if not tags:
        return
    # One trial (each as it ends): its runs only, not the whole study's, read each time.
    only = f"tags.{T.OPTUNA_TRIAL} = '{next(iter(tags))}'" if len(tags) == 1 else ""
    mlflow_client, runs = _study_runs(study_name, only)
    for run in runs:
        number = int(run.data.tags.get(T.OPTUNA_TRIAL, -1))
        if number in tags:
            mlflow_client.log_batch(run.info.run_id, tags=T.as_run_tags(tags[number]))


@uninterrupted
def end_stale_trial_runs(study_name: str, numbers: list[int]) -> None:
    """End KILLED the RUNNING runs of trials whose process Optuna found gone (its heartbeat
    stopped, maybe on another host, where no stale-run check of ours can see it)."""
    if not numbers:
        return
    mlflow_client, runs = _study_runs(study_name, "attributes.status = 'RUNNING'")
    for run in runs:
        number = int(run.data.tags.get(T.OPTUNA_TRIAL, -1))
        if number in numbers:
            mlflow_client.set_tag(run.info.run_id, T.STOPPED_BY, STALE_TRIAL)
            mlflow_client.set_terminated(run.info.run_id, "KILLED")
            log.info("closed run %s of stale trial %d as KILLED", run.info.run_id, number)


def log_study(study, sweep_dir: Path, results: dict, plots: list[Path]) -> None:
    """A study on the sweep's parent run: its best params and value or its Pareto front (as a
    table), the trials table, the results file and Optuna's plots, under `study/`."""
    parent = os.environ.get(PARENT_RUN_ENV)
    if not parent:
        return
    import pandas as pd

    mlflow_client = client()
    if "best_value" in results:
        mlflow_client.log_metric(parent, "best_value", float(results["best_value"]))
        for key, value in results["best_params"].items():
            mlflow_client.log_param(parent, f"best.{key}", redact(str(value)))
    if "solutions" in results:
        names = results["metric"] if isinstance(results.get("metric"), list) else None
        rows = []
        for trial in study.best_trials:
            values = dict(zip(names or range(len(trial.values)), trial.values, strict=True))
            rows.append({"trial": trial.number, **values, **trial.params})
        mlflow_client.log_table(parent, pd.DataFrame(rows), artifact_file="study/pareto_front.json")
        mlflow_client.log_metric(parent, "pareto_size", len(rows))
    tags = {
        T.OPTUNA_STUDY: study.study_name,
        T.OPTUNA_DIRECTIONS: ",".join(d.name.lower() for d in study.directions),
    }
    if "metric" in results:
        metric = results["metric"]
        tags[T.OPTIMIZED_METRIC] = ",".join(metric) if isinstance(metric, list) else metric
    if "best_value" in results:
        tags[T.BEST_TRIAL] = str(study.best_trial.number)
    mlflow_client.log_batch(parent, tags=T.as_run_tags(tags))
    for name in ("trials.csv", "optimization_results.yaml"):
        mlflow_client.log_artifact(parent, str(sweep_dir / name), artifact_path="study")
    for path in plots:
        mlflow_client.log_artifact(parent, str(path), artifact_path="study")
