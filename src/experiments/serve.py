"""Serve a logged or registered model over HTTP: `python -m experiments.serve MODEL [--port 5001]`
(`make serve MODEL=models:/NAME@ALIAS`), bound to 127.0.0.1 unless `--host` says otherwise.

MLflow's scoring server (`POST /invocations`, `GET /ping`), from the project's virtualenv with
nothing activated. Each image answers with its class, confidence and every class's probability.
It takes uint8 arrays of the model's size (`{"inputs": [...]}`), refusing values that are not
integers from 0 to 255, and encoded images (`{"images": [base64 PNG or JPEG, ...]}`), decoded as
training decodes them and resized to the model's size.
"""

from __future__ import annotations

import argparse
import sys

from experiments import compose_project_config
from experiments.cli import server_arguments
from experiments.core.errors import ExperimentError


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m experiments.serve`."""
    parser = argparse.ArgumentParser(prog="python -m experiments.serve", description=__doc__)
    parser.add_argument(
        "model", help="runs:/<run id>/model, models:/<name>@<alias> or models:/<name>/<version>"
    )
    server_arguments(parser, port=5001)
    args = parser.parse_args(argv)
    from experiments import tracking
    from experiments.core.backend import use_backend

    project = compose_project_config()
    try:
        use_backend(project.backend)  # before MLflow loads the model with Keras
        tracking.open_store(args.tracking_uri or str(project.tracking.uri))
        tracking.registry.source_run(args.model)  # an unknown model or alias: one line
        app = tracking.serving.serving_app(args.model)
    except ExperimentError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"serving {args.model} on http://{args.host}:{args.port}/invocations", flush=True)
    tracking.serving.run(app, args.host, args.port)
    return 0


if __name__ == "__main__":
    from experiments.cli import exit_with

    exit_with(main)
