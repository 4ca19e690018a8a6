"""Unfinished runs and what can be resumed: `python -m experiments.runs [list|sync]`.

`list` (the default) closes as KILLED the runs that dead processes on this host left RUNNING,
then prints every run that did not finish: its status, why it ended, the epochs saved for resuming
it, and the command that resumes it. `sync` sends the records that a lost tracking server could
not take (the outbox) and says what it sent.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from experiments import compose_project_config
from experiments.errors import ExperimentError

ACTIONS = ("list", "sync")


def unfinished_runs(checkpoint_dir: Path) -> list[dict]:
    """One row per unfinished training or sweep run in the store, newest first."""
    from mlflow.tracking import MlflowClient

    from experiments.checkpoints import RunCheckpoints

    client = MlflowClient()
    experiments = {e.experiment_id: e.name for e in client.search_experiments()}
    if not experiments:
        return []
    wanted = "attributes.status != 'FINISHED'"  # MLflow's filters have no OR
    rows = []
    for run in client.search_runs(
        list(experiments), filter_string=wanted, order_by=["attributes.start_time DESC"]
    ):
        tags = run.data.tags
        if tags.get("run_type") == "evaluate":
            continue
        state = RunCheckpoints(checkpoint_dir / run.info.run_id)
        resumable = run.info.status != "RUNNING" and bool(tags.get("identity") or tags.get("sweep"))
        why = tags.get("stopped_by") or tags.get("killed_reason") or tags.get("error") or ""
        rows.append(
            {
                "run_id": run.info.run_id,
                "experiment": experiments[run.info.experiment_id],
                "name": run.info.run_name,
                "status": run.info.status,
                "why": why.splitlines()[0][:120] if why else "",
                "epochs_saved": state.completed_epochs(),
                "resumable": resumable,
                "resume_with": resume_command(tags, run.info.run_id) if resumable else "",
            }
        )
    return rows


def resume_command(tags: dict, run_id: str) -> str:
    """The command that continues a run: its own command (auto-resume), or with its id."""
    command = tags.get("command", "").split()
    if tags.get("sweep") == "true":
        overrides = tags.get("sweep_overrides", "")
        return f"python -m experiments.train -m {overrides}".strip()
    if command:
        args = [a for a in command[1:] if not a.startswith("resume=")]
        return " ".join(["python -m experiments.train", *args, f"resume={run_id}"])
    return f"python -m experiments.train <its overrides> resume={run_id}"


def sync_outboxes(outbox_dir: Path) -> list[tuple[str, int, str]]:
    """Send every outbox under `outbox_dir`: (run id, calls sent, error or '') per run."""
    from experiments import tracking

    results = []
    for folder in sorted(p for p in outbox_dir.glob("*") if (p / "calls.jsonl").is_file()):
        meta = json.loads((folder / "meta.json").read_text())
        import mlflow

        mlflow.set_tracking_uri(meta["uri"])
        try:
            sent = tracking.flush_outbox(folder)
        except Exception as err:  # the server is still lost, or refused a call
            results.append((meta["run_id"], 0, str(err).splitlines()[0][:200]))
            continue
        results.append((meta["run_id"], sent, ""))
    return results


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m experiments.runs`."""
    parser = argparse.ArgumentParser(prog="python -m experiments.runs", description=__doc__)
    parser.add_argument(
        "args",
        nargs="*",
        metavar="[list|sync] [OVERRIDE ...]",
        help="the action (default: list), then config overrides such as paths.root_dir=/x",
    )
    words = parser.parse_args(argv).args
    action = words.pop(0) if words and words[0] in ACTIONS else "list"
    args = argparse.Namespace(action=action, overrides=words)
    from experiments import tracking

    project = compose_project_config(args.overrides)
    if args.action == "sync":
        results = sync_outboxes(Path(str(project.tracking.outbox_dir)))
        if not results:
            print(f"nothing to send: {project.tracking.outbox_dir} holds no kept records")
        for run_id, sent, error in results:
            print(f"run {run_id}: " + (f"not sent ({error})" if error else f"{sent} records sent"))
        return 1 if any(error for *_, error in results) else 0
    try:
        tracking.open_store(str(project.tracking.uri))
        rows = unfinished_runs(Path(str(project.paths.checkpoint_dir)))
    except ExperimentError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not rows:
        print("no unfinished runs")
        return 0
    for row in rows:
        print(
            f"{row['run_id']}  {row['status']:<8} {row['experiment']}/{row['name']}  "
            f"epochs saved: {row['epochs_saved']}  {row['why']}"
        )
        if row["resume_with"]:
            print(f"    resume: {row['resume_with']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
