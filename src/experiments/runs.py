"""Unfinished runs and what can be resumed: `python -m experiments.runs [list|sync]`.

`list` (the default) first sends what outboxes kept for the store, then closes as KILLED the runs
that dead processes on this host left RUNNING (not those whose records still wait in an outbox),
then prints every run that did not finish: its status, why it ended, the epochs saved for resuming
it, and the command that resumes it; and the outboxes still waiting for a server. `sync` sends
the records that a lost tracking server could not take (the outbox) and says what it sent.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from experiments import compose_project_config
from experiments.core.errors import ExperimentError

ACTIONS = ("list", "sync")


def unfinished_runs(checkpoint_dir: Path) -> list[dict]:
    """One row per unfinished training or sweep run in the store, newest first."""
    from experiments import tracking
    from experiments.tracking import tags as T
    from experiments.training.checkpoints import RunCheckpoints

    rows = []
    for run in tracking.run_rows(
        "attributes.status != 'FINISHED'",  # MLflow's filters have no OR
        order_by=["attributes.start_time DESC"],
    ):
        tags = run.tags
        if tags.get(T.RUN_TYPE) == "evaluate":
            continue
        state = RunCheckpoints(checkpoint_dir / run.run_id)
        resumable = run.status != "RUNNING" and bool(tags.get(T.IDENTITY) or tags.get(T.SWEEP))
        why = tags.get(T.STOPPED_BY) or tags.get(T.KILLED_REASON) or tags.get(T.ERROR) or ""
        rows.append(
            {
                "run_id": run.run_id,
                "experiment": run.experiment,
                "name": run.name,
                "status": run.status,
                "why": why.splitlines()[0][:120] if why else "",
                "epochs_saved": state.completed_epochs(),
                "resumable": resumable,
                "resume_with": resume_command(tags, run.run_id) if resumable else "",
            }
        )
    return rows


def resume_command(tags: dict, run_id: str) -> str:
    """The command that continues a run, every word quoted for a POSIX shell: its sweep's
    overrides, or its own command with its id. Whoever can write to the store can write these
    tags, so only overrides of the project's config are given back (the project checks each
    before any work); flags and `hydra` settings are left out, and a comment after the command
    names them."""
    from experiments.tracking import tags as T

    if tags.get(T.SWEEP) == "true":
        start = ["python", "-m", "experiments.train", "-m"]
        given, end = tags.get(T.SWEEP_OVERRIDES, "").split(), []
    elif command := _words(tags.get(T.COMMAND, "")):
        start = ["python", "-m", "experiments.train"]
        given = [w for w in command[1:] if not w.startswith("resume=")]
        end = [f"resume={run_id}"]
    else:
        return f"python -m experiments.train <its overrides> resume={run_id}"
    kept = [w for w in given if _project_override(w)]
    line = shlex.join([*start, *kept, *end])
    if left := [w for w in given if w not in kept]:
        line += f"  # left out, not overrides of the project's config: {shlex.join(left)}"
    return line


def _words(command: str) -> list[str]:
    """A stored command's words: quoted as a shell quotes them, or (runs recorded before the
    command tag was quoted) split at spaces."""
    try:
        return shlex.split(command)
    except ValueError:
        return command.split()


def _project_override(word: str) -> bool:
    """Whether `word` is one Hydra override of the project's config (not `hydra.*`)."""
    from hydra.errors import HydraException

    from experiments.core.job import parsed

    if word.startswith("-") or word.lstrip("+~").startswith(("hydra.", "hydra/")):
        return False
    try:
        return len(parsed([word])) == 1
    except HydraException:
        return False


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
    if odd := next((w for w in words if "=" not in w), None):
        parser.error(
            f"{odd!r} is neither an action ({', '.join(ACTIONS)}) nor a setting KEY=VALUE "
            f"(e.g. paths.root_dir=/x)"
        )
    args = argparse.Namespace(action=action, overrides=words)
    from experiments import tracking

    project = compose_project_config(args.overrides)
    if args.action == "sync":
        results = tracking.sync_outboxes(Path(str(project.tracking.outbox_dir)))
        if not results:
            print(f"nothing to send: {project.tracking.outbox_dir} holds no kept records")
        for run_id, sent, error in results:
            print(f"run {run_id}: " + (f"not sent ({error})" if error else f"{sent} records sent"))
        return 1 if any(error for *_, error in results) else 0
    outbox_dir = Path(str(project.tracking.outbox_dir))
    uri = str(project.tracking.uri)
    if uri.startswith("sqlite:///") and not (store := tracking.sqlite_path(uri)).exists():
        # Nothing has run there: said so, with the path (a typo shows), and no store is made.
        print(
            f"no unfinished runs: there is no MLflow store at {store} yet (training creates it; "
            f"if you expected runs there, fix tracking.uri or MLFLOW_TRACKING_URI)"
        )
        print_waiting(outbox_dir)
        return 0
    try:
        tracking.open_store(uri, outbox_dir)
        rows = unfinished_runs(Path(str(project.paths.checkpoint_dir)))
    except ExperimentError as err:
        print(f"error: {err}", file=sys.stderr)
        print_waiting(outbox_dir)
        return 2
    waiting = tracking.pending_outboxes(outbox_dir)
    if not rows and not waiting:
        print("no unfinished runs")
        return 0
    for row in rows:
        why = row["why"]
        if row["run_id"] in waiting:
            why = f"waiting to be sent: {waiting[row['run_id']]} records in {outbox_dir}"
        print(
            f"{row['run_id']}  {row['status']:<8} {row['experiment']}/{row['name']}  "
            f"epochs saved: {row['epochs_saved']}  {why}"
        )
        if row["resume_with"] and row["run_id"] not in waiting:
            print(f"    resume: {row['resume_with']}")
    print_waiting(outbox_dir)
    return 0


def print_waiting(outbox_dir: Path) -> None:
    """The outboxes whose records wait for a tracking server, and how to send them."""
    from experiments import tracking

    waiting = tracking.pending_outboxes(outbox_dir)
    if not waiting:
        return
    print(f"waiting to be sent ({outbox_dir}):")
    for run_id, count in waiting.items():
        print(f"    run {run_id}: {count} records")
    print(
        "    they are sent by the next command that opens their store, or now with: "
        "python -m experiments.runs sync"
    )


if __name__ == "__main__":
    from experiments.cli import exit_with

    exit_with(main)
