"""MLflow's UI on the project's store: `python -m experiments.ui [--port 5000]` (`make ui`).

Prints each experiment's link, which opens its runs as model training in the comparison view
(what each run varied and what it gave; see `experiments.tracking.views`), then runs the UI
until it is stopped.
"""

from __future__ import annotations

import argparse
import os
import sys

from omegaconf import OmegaConf

from experiments import compose_project_config
from experiments.cli import server_arguments
from experiments.core.errors import ExperimentError


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m experiments.ui`."""
    parser = argparse.ArgumentParser(prog="python -m experiments.ui", description=__doc__)
    server_arguments(parser, port=5000, store="a local store; ")
    args = parser.parse_args(argv)
    from experiments import tracking

    project = compose_project_config()
    uri = args.tracking_uri or str(project.tracking.uri)
    if not uri.startswith("sqlite:///"):
        print(
            f"error: {uri} is not a local store; a tracking server shows its own UI: open it "
            f"in a browser, or give --tracking-uri sqlite:///PATH/mlflow.db",
            file=sys.stderr,
        )
        return 2
    try:
        tracking.open_store(uri, project.tracking.outbox_dir)
        found = tracking.experiments()
    except ExperimentError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    base = f"http://{args.host}:{args.port}"
    print(f"MLflow UI: {base}")
    for experiment_id, name in found.items():
        if name == "Default":  # MLflow's own, which our runs never use
            continue
        tracking.prepare_experiment(experiment_id)
        print(f"  {name}: {tracking.experiment_link(base, experiment_id)}")
    sys.stdout.flush()
    settings = OmegaConf.merge(project.tracking, {"uri": uri})
    command = tracking.ui_command(uri, tracking.artifact_root(settings), args.host, args.port)
    os.execv(command[0], command)  # the UI replaces this process: Ctrl-C stops it
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
