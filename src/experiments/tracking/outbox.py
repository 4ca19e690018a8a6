"""Records waiting for a lost tracking server: one folder per run, sent in order when it answers.

MLflow has no offline queue for a run logged to a server (its async logging retries in memory and
loses everything when the process ends), so ours is a folder per run: `calls.jsonl` (one call a
line, in order), `files/` (copies of the artifacts, the model saved in MLflow's format) and `sent`
(how many calls went through). Every write of a run goes through its outbox, to a local store too
(where it is sent at once), so there is one path for all of them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from experiments.core.interrupts import uninterrupted
from experiments.core.processes import RUN_KEYS, Owner, this_process
from experiments.tracking import tags as T
from experiments.tracking.client import client, is_local, point_at, unreachable

log = logging.getLogger("experiments.tracking")

# While the server is lost, calls go straight to the outbox; it is tried again after this long.
RETRY_AFTER_S = 10.0
MAX_PARAMS_PER_CALL = 100
MAX_METRICS_PER_CALL = 1000  # MLflow's limit for one log_batch
DATASET_CONTEXT = "mlflow.data.context"
# The `stopped_by` of a trial's run closed because its process stopped beating (tracking.sweeps).
STALE_TRIAL = "stale_trial"


class Outbox:
    """The calls of one run that a lost tracking server could not take, kept on local disk.

    The run sends them when the server answers again; `python -m experiments.runs sync` sends
    what is left.
    """

    def __init__(self, root: Path, run_id: str, uri: str):
        self.dir = Path(root) / run_id
        self.run_id = run_id
        self.uri = uri
        self.remote = not is_local(uri)
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
                if not unreachable(err):
                    raise
                self.went_down(err)
        self.keep(op, payload, files or [])

    def keep(self, op: str, payload: dict, files: list[Path]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = {"uri": self.uri, "run_id": self.run_id, "owner": this_process().to_dict(RUN_KEYS)}
        (self.dir / "meta.json").write_text(json.dumps(meta))
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
            if not unreachable(err):
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
    from mlflow.entities import Metric, Param

    mlflow_client = client()
    if op == "metrics":
        metrics = [
            Metric(k, v, payload["timestamp"], payload["step"])
            for k, v in payload["metrics"].items()
        ]
        for start in range(0, len(metrics), MAX_METRICS_PER_CALL):
            mlflow_client.log_batch(run_id, metrics=metrics[start : start + MAX_METRICS_PER_CALL])
    elif op == "params":
        items = list(payload["params"].items())
        for start in range(0, len(items), MAX_PARAMS_PER_CALL):
            params = [Param(k, v) for k, v in items[start : start + MAX_PARAMS_PER_CALL]]
            mlflow_client.log_batch(run_id, params=params)
    elif op == "tags":
        mlflow_client.log_batch(run_id, tags=T.as_run_tags(payload["tags"]))
    elif op == "inputs":
        _log_inputs(mlflow_client, run_id, payload["datasets"])
    elif op == "artifact":
        for path in files:
            if Path(path).is_dir():
                mlflow_client.log_artifacts(run_id, str(path), payload.get("artifact_path"))
            else:
                mlflow_client.log_artifact(run_id, str(path), payload.get("artifact_path"))
    elif op == "end":
        mlflow_client.set_terminated(run_id, payload["status"], payload.get("end_time"))
    else:  # pragma: no cover - a file written by another version
        raise ValueError(f"unknown outbox call {op!r}")


def _log_inputs(mlflow_client, run_id: str, datasets: list[dict], attempts: int = 3) -> None:
    """Log dataset inputs, tried again when another worker logged the same dataset at the same
    moment: the server's get-or-create of a dataset is not atomic, and the loser of that race
    gets a unique-key violation (an MLflow server on PostgreSQL with several workers)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.exceptions import MlflowException

    inputs = [
        DatasetInput(Dataset(**item["dataset"]), [InputTag(DATASET_CONTEXT, item["context"])])
        for item in datasets
    ]
    for attempt in range(attempts):
        try:
            mlflow_client.log_inputs(run_id, datasets=inputs)
            return
        except MlflowException as err:
            if attempt == attempts - 1 or "unique" not in str(err).lower():
                raise
            time.sleep(0.5 * (attempt + 1))


@uninterrupted
def flush_outbox(folder: Path) -> int:
    """Send the calls kept in an outbox `folder` that were not sent yet; the number sent.

    Progress is recorded after each call, so an interrupted flush resumes where it stopped. A run
    whose end it sends loses the tags of a stale-run check that closed it meanwhile (an older
    version, or another host that could not see this outbox): they are contradicted.
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
    if any(call["op"] == "end" for call in calls):
        clear_stale_tags(meta["run_id"])
    shutil.rmtree(folder)
    return len(calls) - done


def clear_stale_tags(run_id: str) -> None:
    """Delete the tags by which a stale-run check said the run's process died."""
    mlflow_client = client()
    tags = mlflow_client.get_run(run_id).data.tags
    if T.KILLED_REASON in tags:
        mlflow_client.delete_tag(run_id, T.KILLED_REASON)
    if tags.get(T.STOPPED_BY) == STALE_TRIAL:
        mlflow_client.delete_tag(run_id, T.STOPPED_BY)


def pending_outboxes(outbox_dir: Path, uri: str | None = None) -> dict[str, int]:
    """Runs whose records wait in an outbox under `outbox_dir` (for the store `uri`, or any):
    run id -> records not sent yet."""
    waiting = {}
    for folder in sorted(Path(outbox_dir).glob("*")):
        calls_path = folder / "calls.jsonl"
        if not calls_path.is_file():
            continue
        meta = json.loads((folder / "meta.json").read_text())
        if uri is not None and meta["uri"] != uri:
            continue
        sent_path = folder / "sent"
        sent = int(sent_path.read_text()) if sent_path.is_file() else 0
        waiting[meta["run_id"]] = len(calls_path.read_text().splitlines()) - sent
    return waiting


def sync_outboxes(outbox_dir: Path, uri: str | None = None) -> list[tuple[str, int, str]]:
    """Send every outbox under `outbox_dir` (those kept for the store `uri`, or all): (run id,
    calls sent, error or '') per run."""
    results = []
    for run_id in pending_outboxes(outbox_dir, uri):
        folder = Path(outbox_dir) / run_id
        meta = json.loads((folder / "meta.json").read_text())
        owner = Owner.from_dict(meta.get("owner", {}), RUN_KEYS)
        if owner and owner.pid != os.getpid() and owner.on_this_host() and owner.alive():
            # Its run is still going and sends them itself: two senders would send twice.
            results.append((run_id, 0, f"process {owner.pid}, whose run it is, sends them"))
            continue
        point_at(meta["uri"])
        try:
            sent = flush_outbox(folder)
        except Exception as err:  # the server is still lost, or refused a call
            results.append((run_id, 0, str(err).splitlines()[0][:200]))
            continue
        results.append((run_id, sent, ""))
    if uri is not None:
        point_at(uri)
    return results
