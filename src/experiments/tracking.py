"""The tracking group: MLflow runs with params, tags, data lineage, metrics, artifacts and models.

MLflow is imported inside the functions, so composing a config never pays for it.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from experiments.errors import ExperimentError
from experiments.interrupts import deferred, raise_if_pending, uninterrupted

log = logging.getLogger(__name__)

# A multirun's parent run id, set by MlflowSweepCallback for the jobs it launches.
PARENT_RUN_ENV = "EXPERIMENTS_MLFLOW_PARENT_RUN_ID"
MAX_PARAMS_PER_CALL = 100
MAX_PARAM_CHARS = 6000
LOCAL_SCHEMES = ("sqlite:", "file:", "/")
# The sweep a job belongs to (a digest of the multirun's overrides), set by MlflowSweepCallback.
SWEEP_IDENTITY_ENV = "EXPERIMENTS_SWEEP_IDENTITY"
# MLflow's HTTP client retries a failed call for minutes by default; a lost server must cost
# seconds, since every call is then kept in the outbox instead. The user's own settings win.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
}
# While the server is lost, calls go straight to the outbox; it is tried again after this long.
RETRY_AFTER_S = 10.0


@uninterrupted
def set_tracking(tracking) -> str:
    """Point MLflow at `tracking.uri` and return the id of `tracking.experiment`, creating it."""
    from mlflow.tracking import MlflowClient

    uri = str(tracking.uri)
    guard = nullcontext()
    if uri.startswith("sqlite:///"):
        from filelock import FileLock

        database = Path(uri[len("sqlite:///") :])
        database.parent.mkdir(parents=True, exist_ok=True)
        # MLflow creates and migrates a new sqlite store without a lock, so processes opening one
        # new store together (a sweep shared by several processes) race on its tables.
        guard = FileLock(f"{database}.lock")
    with guard:
        _point_at(uri)
        experiment_id = _experiment_id(MlflowClient(), tracking, uri, uri.startswith(LOCAL_SCHEMES))
    close_stale_runs(MlflowClient())
    return experiment_id


@uninterrupted
def open_store(uri: str) -> None:
    """Point MLflow at `uri` and close the runs that dead processes left RUNNING there."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    _point_at(uri)
    try:
        close_stale_runs(MlflowClient())
    except MlflowException as err:
        raise ExperimentError(_unreachable_message(uri, err)) from None


def check_reachable(tracking) -> None:
    """A tracking server that does not answer stops the run now, in seconds, before any data is
    loaded; a local store needs no check."""
    import urllib.error
    import urllib.request

    uri = str(tracking.uri)
    if uri.startswith(LOCAL_SCHEMES) or not uri.startswith(("http://", "https://")):
        return
    timeout = float(
        os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_TIMEOUT"])
    )
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # it answers; a proxy may not route /health
    except (OSError, ValueError) as err:
        raise ExperimentError(_unreachable_message(uri, err)) from None


def _point_at(uri: str) -> None:
    import mlflow

    if not uri.startswith(LOCAL_SCHEMES):
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
    mlflow.set_tracking_uri(uri)


def _unreachable_message(uri: str, err: BaseException) -> str:
    return (
        f"cannot reach the MLflow store tracking.uri={uri} ({str(err).splitlines()[0][:300]}); "
        f"start the server or fix tracking.uri / MLFLOW_TRACKING_URI"
    )


def artifact_root(tracking) -> Path | None:
    """Where a new experiment keeps artifacts: `tracking.artifact_dir`, else beside an sqlite
    database (`sqlite:////x/mlflow.db` -> `/x/artifacts`), else MLflow's default."""
    if tracking.get("artifact_dir"):
        return Path(str(tracking.artifact_dir))
    uri = str(tracking.uri)
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :]).parent / "artifacts"
    return None


def _experiment_id(client, tracking, uri: str, local: bool) -> str:
    from mlflow.exceptions import MlflowException

    name = str(tracking.experiment)
    try:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            root = artifact_root(tracking) if local else None
            location = root.resolve().as_uri() if root else None
            try:
                return client.create_experiment(name, artifact_location=location)
            except MlflowException:  # created meanwhile by a concurrent job
                experiment = client.get_experiment_by_name(name)
    except MlflowException as err:
        raise ExperimentError(_unreachable_message(uri, err)) from None
    if experiment.lifecycle_stage == "deleted":
        raise ExperimentError(
            f"MLflow experiment {name!r} is deleted; restore it in the UI "
            f"(mlflow experiments restore) or set tracking.experiment to another name"
        )
    return experiment.experiment_id


@dataclass
class ActiveRun:
    """The run being recorded: its id, whether it was resumed, and its outbox."""

    run_id: str
    resumed: bool
    outbox: Outbox
    last_step: int = 0  # of the epoch metrics logged so far


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
    import mlflow
    from mlflow.tracking import MlflowClient

    # A signal while the run is opened or closed waits for it (see experiments.interrupts).
    with deferred(hold=True):
        experiment_id = set_tracking(tracking)
        parent = os.environ.get(PARENT_RUN_ENV) or None
        if parent:  # children live in their parent's experiment, or the UI cannot nest them
            experiment_id = MlflowClient().get_run(parent).info.experiment_id
            if sweep := os.environ.get(SWEEP_IDENTITY_ENV):
                # Workers that started together may each have opened a parent: all use one.
                parent = sweep_parent(MlflowClient(), experiment_id, sweep) or parent
                os.environ[PARENT_RUN_ENV] = parent
        resumed = resumable_run(experiment_id, identity, resume) if identity else None
        tags = tags | process_tags() | ({"identity": identity} if identity else {})
        if sweep := os.environ.get(SWEEP_IDENTITY_ENV):
            tags["sweep_identity"] = sweep
        if resumed:
            run = mlflow.start_run(run_id=resumed)
            MlflowClient().log_batch(resumed, tags=_run_tags(tags | {"resumed": "true"}))
            log.info("resuming run %s (resume=%s)", resumed, resume)
        else:
            run = mlflow.start_run(
                experiment_id=experiment_id, run_name=run_name, parent_run_id=parent, tags=tags
            )
        active = ActiveRun(
            run.info.run_id,
            bool(resumed),
            Outbox(Path(str(tracking.outbox_dir)), run.info.run_id, str(tracking.uri)),
        )
        _active["run"] = active
    try:
        raise_if_pending()
        yield active
    except BaseException as err:
        with deferred(hold=True):
            log_memory()
            name = type(err).__name__
            if name == "TrialPruned":
                set_tags({"pruned": "true"})
                _end_run("FINISHED")
            elif name in ("Interrupted", "KeyboardInterrupt"):
                set_tags({"stopped_by": getattr(err, "name", "SIGINT")})
                _end_run("KILLED")
            else:
                set_tags({"error": f"{name}: {err}"[:MAX_PARAM_CHARS]})
                _end_run("FAILED")
        raise
    else:
        with deferred():  # a signal now ends the process after the run is FINISHED
            log_memory()
            _end_run("FINISHED")
    finally:
        _active.pop("run", None)
        _active["last"] = active
        active.outbox.report()


def recorded(run_id: str) -> set[str]:
    """What a run already holds of its opening records: 'config' (the last of its params was
    logged) and 'task' (its data lineage)."""
    from mlflow.tracking import MlflowClient

    data = MlflowClient().get_run(run_id).data
    found = set()
    if "config/overrides.yaml" in {a.path for a in MlflowClient().list_artifacts(run_id, "config")}:
        found.add("config")
    if "class_names" in data.tags:
        found.add("task")
    return found


def run_status(run_id: str) -> str | None:
    """The status of a run, or None when the store cannot tell."""
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient().get_run(run_id).info.status
    except Exception:  # a lost server: the caller says what it knows without it
        return None


def last_run_id() -> str | None:
    """The id of the run this process recorded last, if any."""
    last = _active.get("run") or _active.get("last")
    return last.run_id if last else None


def _end_run(status: str) -> None:
    """End the active run with `status`, after every call kept in its outbox."""
    import mlflow

    active = _active["run"]
    # mlflow.end_run() would call the server at once, ahead of the kept calls; the status goes
    # through the outbox instead, and the fluent API only forgets the run (its private stack).
    stack = mlflow.tracking.fluent._active_run_stack.get()
    if stack and stack[-1].info.run_id == active.run_id:
        stack.pop()
    os.environ.pop("MLFLOW_RUN_ID", None)
    active.outbox.call("end", {"status": status, "end_time": _now_ms()})


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Log metrics to the active run, or keep them in its outbox while the server is lost."""
    active = _active.get("run")
    if active is None:
        return
    if step is not None:
        active.last_step = max(active.last_step, step)
    payload = {"metrics": {k: float(v) for k, v in metrics.items()}, "step": step or 0}
    active.outbox.call("metrics", payload | {"timestamp": _now_ms()})


def set_tags(tags: dict[str, str]) -> None:
    """Set tags on the active run (through its outbox)."""
    active = _active.get("run")
    if active is not None:
        active.outbox.call("tags", {"tags": {k: str(v) for k, v in tags.items()}})


def log_artifact(path: Path, artifact_path: str | None = None) -> None:
    """Log a file to the active run (through its outbox)."""
    active = _active.get("run")
    if active is not None:
        active.outbox.call("artifact", {"artifact_path": artifact_path}, files=[Path(path)])


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
    from mlflow.tracking import MlflowClient

    active = _active["run"]
    logged = {m.step for m in MlflowClient().get_metric_history(active.run_id, "loss")}
    missing = [r for r in records if r["epoch"] not in logged]
    for record in missing:
        log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=record["epoch"])
    return len(missing)


def _now_ms() -> int:
    return int(time.time() * 1000)


def process_tags() -> dict[str, str]:
    """Which process on which host runs the run: a run left RUNNING by a dead one is closed.

    They also tell which trials of a sweep shared a process (memory), and where a launcher ran.
    """
    import psutil

    return {
        "host": socket.gethostname(),
        "pid": str(os.getpid()),
        "pid_started": f"{psutil.Process().create_time():.2f}",
    }


def _run_tags(tags: dict[str, str]) -> list:
    from mlflow.entities import RunTag

    return [RunTag(k, str(v)[:MAX_PARAM_CHARS]) for k, v in tags.items()]


def _process_alive(tags: dict[str, str]) -> bool:
    import psutil

    try:
        process = psutil.Process(int(tags.get("pid", "0")))
        started = float(tags.get("pid_started", "0"))
        # A pid is reused by later processes: it is the run's only if it started then.
        return not started or abs(process.create_time() - started) < 1.0
    except (psutil.Error, ValueError):
        return False


@uninterrupted
def close_stale_runs(client) -> list[str]:
    """Close as KILLED every run left RUNNING on this host by a process that no longer exists."""
    host = socket.gethostname()
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    stale = [
        run
        for run in client.search_runs(
            experiments, filter_string=f"attributes.status = 'RUNNING' and tags.host = '{host}'"
        )
        if not _process_alive(run.data.tags)
    ]
    for run in stale:
        pid = run.data.tags.get("pid", "?")
        client.set_tag(
            run.info.run_id,
            "killed_reason",
            f"process {pid} on {host} ended without closing the run (kill -9, out of memory, "
            f"reboot); closed by process {os.getpid()}",
        )
        client.set_terminated(run.info.run_id, "KILLED")
        log.warning(
            "run %s was left RUNNING by process %s, which no longer exists: closed as KILLED",
            run.info.run_id,
            pid,
        )
    return [run.info.run_id for run in stale]


def resumable_run(experiment_id: str, identity: str, resume: str) -> str | None:
    """The id of the run to continue: the newest interrupted run of `identity` for `auto`,
    the named run for a run id, or None (a new run)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    if resume == "never":
        return None
    if resume != "auto":
        try:
            run = client.get_run(resume)
        except MlflowException:
            raise ExperimentError(
                f"resume={resume}: no such run in {client.tracking_uri}; list the runs that can "
                f"be resumed with: python -m experiments.runs"
            ) from None
        if run.info.status == "FINISHED":
            raise ExperimentError(
                f"resume={resume}: that run is FINISHED and is never resumed; drop resume= to "
                f"start a new run"
            )
        if run.data.tags.get("identity") != identity:
            raise ExperimentError(
                f"resume={resume}: that run was started with another config; rerun its own "
                f"command (see its tag `command`) with resume={resume}"
            )
        return resume
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.identity = '{identity}'",
        order_by=["attributes.start_time DESC"],
    )
    for run in runs:
        if run.info.status in ("KILLED", "FAILED"):
            return run.info.run_id
        if run.info.status == "FINISHED":
            return None  # a finished run is never resumed: the same command starts a new one
    return None


def finished_sweep_job(identity: str):
    """The FINISHED run of this config in a sweep of the same overrides, or None."""
    from mlflow.tracking import MlflowClient

    sweep = os.environ.get(SWEEP_IDENTITY_ENV)
    if not sweep:
        return None
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        experiments,
        filter_string=(
            f"tags.identity = '{identity}' and tags.sweep_identity = '{sweep}' "
            f"and attributes.status = 'FINISHED'"
        ),
        max_results=1,
    )
    return runs[0] if runs else None


def _unreachable(err: BaseException) -> bool:
    """Whether `err` says the tracking server could not be reached (not a refused request)."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(err, (requests.RequestException, ConnectionError, TimeoutError)):
        return True
    text = str(err)
    return isinstance(err, MlflowException) and (
        "Max retries exceeded" in text
        or "Connection" in text
        or "timed out" in text
        or "API request to" in text
    )


class Outbox:
    """The calls of one run that a lost tracking server could not take, kept on local disk.

    MLflow has no offline queue for a run logged to a server (its async logging retries in
    memory and loses everything when the process ends), so ours is a folder per run:
    `calls.jsonl` (one call a line, in order), `files/` (copies of the artifacts, the model
    saved in MLflow's format) and `sent` (how many calls went through). The run sends them when
    the server answers again; `python -m experiments.runs sync` sends what is left.
    """

    def __init__(self, root: Path, run_id: str, uri: str):
        self.dir = Path(root) / run_id
        self.run_id = run_id
        self.uri = uri
        self.remote = not uri.startswith(LOCAL_SCHEMES)
        self.down_since: float | None = None
        self.error = ""

    @property
    def calls_path(self) -> Path:
        return self.dir / "calls.jsonl"

    def pending(self) -> bool:
        return self.calls_path.is_file()

    def is_down(self) -> bool:
        return self.down_since is not None and time.monotonic() - self.down_since < RETRY_AFTER_S

    def went_down(self, err: BaseException) -> None:
        if self.down_since is None:
            log.warning(
                "the tracking server %s does not answer (%s); training goes on and run %s's "
                "records are kept in %s until it does",
                self.uri,
                str(err).splitlines()[0][:200],
                self.run_id,
                self.dir,
            )
        self.down_since = time.monotonic()
        self.error = str(err).splitlines()[0][:200]

    @uninterrupted
    def call(self, op: str, payload: dict, files: list[Path] | None = None) -> None:
        """Send one call now, or keep it (and copies of its files) for later."""
        if not self.remote:
            send(self.run_id, op, payload, files or [])
            return
        if not self.is_down() and (not self.pending() or self.flush()):
            try:
                send(self.run_id, op, payload, files or [])
                return
            except Exception as err:
                if not _unreachable(err):
                    raise
                self.went_down(err)
        self.keep(op, payload, files or [])

    def keep(self, op: str, payload: dict, files: list[Path]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "meta.json").write_text(json.dumps({"uri": self.uri, "run_id": self.run_id}))
        kept = []
        for path in files:
            target = self.dir / "files" / f"{time.time_ns()}" / path.name
            target.parent.mkdir(parents=True)
            (shutil.copytree if path.is_dir() else shutil.copy2)(path, target)
            kept.append(str(target))
        with open(self.calls_path, "a") as f:
            f.write(json.dumps({"op": op, "payload": payload, "files": kept}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def flush(self) -> bool:
        """Send the kept calls in order; True when none is left."""
        try:
            flush_outbox(self.dir)
        except Exception as err:
            if not _unreachable(err):
                raise
            self.went_down(err)
            return False
        if self.down_since is not None:
            log.info(
                "the tracking server answers again; run %s's kept records are sent", self.run_id
            )
        self.down_since = None
        return True

    def report(self) -> None:
        """At the end of the run: one more try, then one line if records are still kept."""
        if self.remote and self.pending() and not self.flush():
            count = len(self.calls_path.read_text().splitlines())
            log.warning(
                "the tracking server %s is still lost: %d records of run %s (metrics, artifacts, "
                "model, its end status) are kept in %s; send them when it is back with: "
                "python -m experiments.runs sync",
                self.uri,
                count,
                self.run_id,
                self.dir,
            )


def send(run_id: str, op: str, payload: dict, files: list) -> None:
    """Make one logging call on run `run_id`."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    if op == "metrics":
        metrics = [
            Metric(k, v, payload["timestamp"], payload["step"])
            for k, v in payload["metrics"].items()
        ]
        client.log_batch(run_id, metrics=metrics)
    elif op == "tags":
        client.log_batch(run_id, tags=_run_tags(payload["tags"]))
    elif op == "artifact":
        for path in files:
            if Path(path).is_dir():
                client.log_artifacts(run_id, str(path), payload.get("artifact_path"))
            else:
                client.log_artifact(run_id, str(path), payload.get("artifact_path"))
    elif op == "end":
        client.set_terminated(run_id, payload["status"], payload.get("end_time"))
    else:  # pragma: no cover - a file written by another version
        raise ValueError(f"unknown outbox call {op!r}")


@uninterrupted
def flush_outbox(folder: Path) -> int:
    """Send the calls kept in an outbox `folder` that were not sent yet; the number sent.

    Progress is recorded after each call, so an interrupted flush resumes where it stopped.
    """
    calls_path = folder / "calls.jsonl"
    if not calls_path.is_file():
        return 0
    meta = json.loads((folder / "meta.json").read_text())
    sent_path = folder / "sent"
    done = int(sent_path.read_text()) if sent_path.is_file() else 0
    calls = [json.loads(line) for line in calls_path.read_text().splitlines() if line.strip()]
    for index in range(done, len(calls)):
        call = calls[index]
        send(meta["run_id"], call["op"], call["payload"], call["files"])
        sent_path.write_text(str(index + 1))
    shutil.rmtree(folder)
    return len(calls) - done


def memory_metrics() -> dict[str, float]:
    """This process's peak resident memory so far and its current one, in MB."""
    import psutil

    rss = psutil.Process().memory_info().rss / 2**20
    try:
        import resource
    except ImportError:  # Windows: psutil reports the peak working set instead
        peak = getattr(psutil.Process().memory_info(), "peak_wset", 0) / 2**20
    else:
        # ru_maxrss is in kilobytes on Linux and in bytes on macOS.
        scale = 1 if sys.platform == "darwin" else 1024
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20
    return {"peak_rss_mb": peak, "rss_mb": rss}


def flatten(node: Any, prefix: str = "") -> dict[str, str]:
    """Dotted keys to string values for every leaf of a nested dict or list."""
    if isinstance(node, dict) and node:
        out = {}
        for key, value in node.items():
            out |= flatten(value, f"{prefix}{key}.")
        return out
    return {prefix.rstrip("."): str(node)[:MAX_PARAM_CHARS]}


@uninterrupted
def log_config(cfg: DictConfig, overrides: list[str]) -> None:
    """Every resolved config leaf as a param, plus the config and overrides as YAML artifacts."""
    import mlflow

    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    # A resumed run keeps the params it has: MLflow refuses a new value (e.g. `resume`), and
    # where it writes may differ from the first command's.
    logged = mlflow.get_run(mlflow.active_run().info.run_id).data.params
    params = [(k, v) for k, v in flatten(container).items() if k not in logged]
    for start in range(0, len(params), MAX_PARAMS_PER_CALL):
        mlflow.log_params(dict(params[start : start + MAX_PARAMS_PER_CALL]))
    mlflow.log_text(OmegaConf.to_yaml(container), "config/config.yaml")
    mlflow.log_text(OmegaConf.to_yaml(list(overrides)), "config/overrides.yaml")


def run_tags(cfg: DictConfig, output_dir: str) -> dict[str, str]:
    """The tags that say what a run was and where it ran."""
    commit, dirty = git_state(cfg.paths.root_dir)
    tags = {
        "task": cfg.task.name,
        "backbone": cfg.backbone.name,
        "strategy": cfg.strategy.name,
        "augmentation": cfg.augmentation.name,
        "hydra_output_dir": output_dir,
        "python_version": platform.python_version(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:MAX_PARAM_CHARS],
    }
    if commit:
        tags |= {"git_commit": commit, "mlflow.source.git.commit": commit, "git_dirty": str(dirty)}
    return tags


def git_state(root: str) -> tuple[str | None, bool]:
    """The checkout's commit and whether its tree has uncommitted changes."""
    try:
        commit = _git(root, "rev-parse", "HEAD").strip()
        dirty = bool(_git(root, "status", "--porcelain").strip())
    except (OSError, subprocess.SubprocessError):
        return None, False
    return commit, dirty


def _git(root: str, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", root, *args], capture_output=True, text=True, timeout=10, check=True
    ).stdout


@uninterrupted
def log_task(task) -> None:
    """Data lineage: an MLflow dataset input per split, class names and counts per class."""
    import mlflow
    import pandas as pd

    from experiments.tasks import SPLITS

    # MLflow hints that integer columns cannot hold NaN: labels never do.
    warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")
    for split in SPLITS:
        data = task.splits[split]
        frame = pd.DataFrame(
            {
                "source": data.sources,
                "label": data.labels,
                "class": [task.class_names[i] for i in data.labels],
            }
        )
        dataset = mlflow.data.from_pandas(frame, source=task.name, name=f"{task.name}-{split}")
        _log_input(dataset, split)
    counts = task.counts()
    mlflow.log_dict(
        {"class_names": task.class_names, "counts": counts, "skipped_files": task.skipped},
        "data/classes.json",
    )
    mlflow.log_metrics({f"n_{s}": sum(counts[s].values()) for s in SPLITS})
    # Last: a run resumed after a kill finds this tag only if its lineage is whole.
    mlflow.set_tag("class_names", ", ".join(task.class_names)[:MAX_PARAM_CHARS])


# The packages a logged model needs besides MLflow (which adds itself): per Keras backend, the
# import names whose installed distributions are pinned.
SERVING_MODULES = {
    "tensorflow": ("keras", "numpy", "tensorflow"),
    "jax": ("keras", "numpy", "jax", "jaxlib"),
    "torch": ("keras", "numpy", "torch"),
}


def serving_requirements(backend: str) -> list[str]:
    """Pinned pip requirements of a Keras model served on `backend`.

    Given these, MLflow skips inferring them, which loads the model again in a subprocess and
    costs ~10 s a run. They are what that inference finds: Keras, NumPy and the backend.
    """
    from importlib.metadata import packages_distributions, version

    distributions = packages_distributions()
    pins = []
    for module in SERVING_MODULES[backend]:
        for name in distributions.get(module, [module])[:1]:  # e.g. tensorflow-cpu
            pins.append(f"{name}=={version(name)}")
    return pins


@uninterrupted
def log_model(model, image_shape, num_classes: int) -> None:
    """Log the Keras model with a uint8-image signature (no input example: mlflow#16183).

    While the tracking server is lost the model is saved in MLflow's format into the outbox and
    sent later as the run's `model/` artifacts, which `runs:/<id>/model` loads the same way.
    """
    import tempfile

    import keras
    import mlflow
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    outputs = 1 if num_classes == 2 else num_classes
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, *image_shape), "image")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, outputs), "probabilities")]),
    )
    model_spec = {
        "signature": signature,
        "pip_requirements": serving_requirements(keras.backend.backend()),
    }
    outbox = _active["run"].outbox
    if not outbox.is_down() and not outbox.pending():
        try:
            mlflow.keras.log_model(model, name="model", **model_spec)
            return
        except Exception as err:
            if not outbox.remote or not _unreachable(err):
                raise
            outbox.went_down(err)
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "model"
        mlflow.keras.save_model(model, str(saved), **model_spec)
        outbox.call("artifact", {"artifact_path": "model"}, files=[saved])


def sweep_identity(overrides: list[str]) -> str:
    """A digest of a multirun's overrides, minus where it writes and how it resumes."""
    import hashlib

    from experiments.sweep import defining_overrides

    return hashlib.sha256(json.dumps(defining_overrides(overrides)).encode()).hexdigest()[:24]


def sweep_parent(client, experiment_id: str, identity: str) -> str | None:
    """The parent run that all workers of a sweep share: of the RUNNING parents of this sweep
    identity, the first opened (then the smallest id), so that every worker picks the same."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=(
            f"tags.sweep_identity = '{identity}' and tags.sweep = 'true' "
            "and attributes.status = 'RUNNING'"
        ),
    )
    if not runs:
        return None
    return min(runs, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id


class MlflowSweepCallback(Callback):
    """Opens one MLflow parent run per multirun; every job of the sweep nests under it.

    The same multirun command run again after an interruption continues its parent run (with
    `resume=auto`), and its jobs skip what already finished and resume what was interrupted.
    """

    def __init__(self) -> None:
        self.run_id: str | None = None

    @uninterrupted
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from mlflow.tracking import MlflowClient

        experiment_id = set_tracking(config.tracking)
        hydra_cfg = config.hydra
        overrides = list(hydra_cfg.overrides.task)
        identity = sweep_identity(overrides)
        sweeper = hydra_cfg.sweeper.get("_target_", "basic").rsplit(".", 1)[-1]
        client = MlflowClient()
        earlier = (
            client.search_runs(
                [experiment_id],
                filter_string=f"tags.sweep_identity = '{identity}' and tags.sweep = 'true'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            if str(config.get("resume", "auto")) != "never"
            else []
        )
        if earlier and earlier[0].info.status in ("KILLED", "FAILED"):
            self.run_id = earlier[0].info.run_id
            client.update_run(self.run_id, status="RUNNING")
            client.log_batch(self.run_id, tags=_run_tags(process_tags() | {"resumed": "true"}))
            log.info("continuing the interrupted sweep's parent run %s", self.run_id)
        elif earlier and earlier[0].info.status == "RUNNING":
            # The same command on another machine (or beside this one) works on a shared study:
            # one parent for all its workers. A parent left RUNNING by a dead process on this
            # host was closed KILLED when the store was opened, and is continued above.
            self.run_id = earlier[0].info.run_id
            log.info("joining the sweep's parent run %s, which another process runs", self.run_id)
        else:
            run = client.create_run(
                experiment_id,
                run_name=f"sweep-{Path(hydra_cfg.sweep.dir).name}",
                tags={
                    "sweep": "true",
                    "sweep_dir": str(hydra_cfg.sweep.dir),
                    "sweep_overrides": " ".join(overrides)[:MAX_PARAM_CHARS],
                    "sweep_identity": identity,
                    "sweeper": sweeper,
                    **process_tags(),
                },
            )
            self.run_id = run.info.run_id
            chosen = sweep_parent(client, experiment_id, identity)
            if chosen and chosen != self.run_id:  # another worker opened one at the same moment
                client.delete_run(self.run_id)
                self.run_id = chosen
                log.info("joining the sweep's parent run %s, opened by another process", chosen)
            else:
                log.info("MLflow parent run %s for this sweep", self.run_id)
        os.environ[PARENT_RUN_ENV] = self.run_id
        os.environ[SWEEP_IDENTITY_ENV] = identity
        # A sweep that dies before on_multirun_end still closes its parent run.
        atexit.register(self.close, None)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.close("FINISHED")

    @uninterrupted
    def close(self, status: str | None) -> None:
        """End the parent run: `status`, or at exit KILLED after a signal and FAILED otherwise."""
        if self.run_id is None:
            return
        from mlflow.tracking import MlflowClient

        from experiments import interrupts

        if status is None:
            status = "KILLED" if interrupts.received() else "FAILED"
        # The one its jobs chose, if workers that started together opened several (start_run).
        self.run_id = os.environ.get(PARENT_RUN_ENV) or self.run_id
        client = MlflowClient()
        children = client.search_runs(
            [client.get_run(self.run_id).info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{self.run_id}'",
        )
        client.set_tag(self.run_id, "jobs", str(len(children)))
        if any(c.info.status == "RUNNING" for c in children):
            # Another worker of a shared study is still running a trial: it closes the parent.
            log.info("parent run %s left RUNNING for the other workers of this sweep", self.run_id)
        else:
            client.set_terminated(self.run_id, status)
        if status == "FINISHED" and not children:
            # Nothing ran (e.g. a complete study resumed): the run the study did run holds it all.
            client.delete_run(self.run_id)
            log.info("no job ran; deleted the empty parent run %s", self.run_id)
        os.environ.pop(PARENT_RUN_ENV, None)
        os.environ.pop(SWEEP_IDENTITY_ENV, None)
        self.run_id = None


def tag_trial_runs(study_name: str, tags: dict[int, dict[str, str]]) -> None:
    """Tag the MLflow runs of a study's trials, by trial number, in the sweep's experiment."""
    parent = os.environ.get(PARENT_RUN_ENV)
    if not parent or not tags:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiment = client.get_run(parent).info.experiment_id
    runs = client.search_runs(
        [experiment], filter_string=f"tags.optuna_study = '{study_name}'", max_results=50000
    )
    for run in runs:
        number = int(run.data.tags.get("optuna_trial", -1))
        if number in tags:
            client.log_batch(run.info.run_id, tags=_run_tags(tags[number]))


def _log_input(dataset, context: str, attempts: int = 3) -> None:
    """`mlflow.log_input`, tried again when another worker logged the same dataset at the same
    moment: the server's get-or-create of a dataset is not atomic, and the loser of that race
    gets a unique-key violation (an MLflow server on PostgreSQL with several workers)."""
    import time

    import mlflow
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            mlflow.log_input(dataset, context=context)
            return
        except MlflowException as err:
            if attempt == attempts - 1 or "unique" not in str(err).lower():
                raise
            time.sleep(0.5 * (attempt + 1))


@uninterrupted
def end_stale_trial_runs(study_name: str, numbers: list[int]) -> None:
    """End KILLED the RUNNING runs of trials whose process Optuna found gone (its heartbeat
    stopped, maybe on another host, where no stale-run check of ours can see it)."""
    parent = os.environ.get(PARENT_RUN_ENV)
    if not parent or not numbers:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiment = client.get_run(parent).info.experiment_id
    for number in numbers:
        found = client.search_runs(
            [experiment],
            filter_string=(
                f"tags.optuna_study = '{study_name}' and tags.optuna_trial = '{number}' "
                "and attributes.status = 'RUNNING'"
            ),
        )
        for run in found:
            client.set_tag(run.info.run_id, "stopped_by", "stale_trial")
            client.set_terminated(run.info.run_id, "KILLED")
            log.info("closed run %s of stale trial %d as KILLED", run.info.run_id, number)


def log_study(study, sweep_dir: Path, results: dict, plots: list[Path]) -> None:
    """A study on the sweep's parent run: its best params and value or its Pareto front (as a
    table), the trials table, the results file and Optuna's plots, under `study/`."""
    parent = os.environ.get(PARENT_RUN_ENV)
    if not parent:
        return
    import pandas as pd
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    if "best_value" in results:
        client.log_metric(parent, "best_value", float(results["best_value"]))
        for key, value in results["best_params"].items():
            client.log_param(parent, f"best.{key}", str(value))
    if "solutions" in results:
        names = results["metric"] if isinstance(results.get("metric"), list) else None
        rows = []
        for trial in study.best_trials:
            values = dict(zip(names or range(len(trial.values)), trial.values, strict=True))
            rows.append({"trial": trial.number, **values, **trial.params})
        client.log_table(parent, pd.DataFrame(rows), artifact_file="study/pareto_front.json")
        client.log_metric(parent, "pareto_size", len(rows))
    tags = {
        "optuna_study": study.study_name,
        "optuna_directions": ",".join(d.name.lower() for d in study.directions),
    }
    if "metric" in results:
        metric = results["metric"]
        tags["optimized_metric"] = ",".join(metric) if isinstance(metric, list) else metric
    if "best_value" in results:
        tags["best_trial"] = str(study.best_trial.number)
    client.log_batch(parent, tags=_run_tags(tags))
    for name in ("trials.csv", "optimization_results.yaml"):
        client.log_artifact(parent, str(sweep_dir / name), artifact_path="study")
    for path in plots:
        client.log_artifact(parent, str(path), artifact_path="study")
