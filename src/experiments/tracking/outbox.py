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

from experiments.interrupts import uninterrupted
from experiments.tracking import tags as T
from experiments.tracking.store import client, is_local, point_at, unreachable

log = logging.getLogger("experiments.tracking")

# While the server is lost, calls go straight to the outbox; it is tried again after this long.
RETRY_AFTER_S = 10.0
MAX_PARAMS_PER_CALL = 100
DATASET_CONTEXT = "mlflow.data.context"


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
        mlflow_client.log_batch(run_id, metrics=metrics)
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


def sync_outboxes(outbox_dir: Path) -> list[tuple[str, int, str]]:
    """Send every outbox under `outbox_dir`: (run id, calls sent, error or '') per run."""
    results = []
    for folder in sorted(p for p in Path(outbox_dir).glob("*") if (p / "calls.jsonl").is_file()):
        meta = json.loads((folder / "meta.json").read_text())
        point_at(meta["uri"])
        try:
            sent = flush_outbox(folder)
        except Exception as err:  # the server is still lost, or refused a call
            results.append((meta["run_id"], 0, str(err).splitlines()[0][:200]))
            continue
        results.append((meta["run_id"], sent, ""))
    return results
