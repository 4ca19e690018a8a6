"""How MLflow's UI opens our experiments: as model training, on a saved view of the runs that
shows what each run varied and what it gave.

MLflow's UI reads both from experiment tags: `mlflow.experimentKind` (model training, not GenAI)
and `mlflow.sharedViewState.<key>`, a view saved from its "Views" menu (columns, sort, filters),
which the link `#/experiments/<id>/runs?viewStateShareKey=<key>` opens. The UI's
"GenAI / Model training" switch is kept in the browser, not in the store: the link sets it with
`workflowType=machine_learning`. No store setting picks the columns of the plain experiment page.
"""

from __future__ import annotations

import base64
import json
import time
import zlib
from pathlib import Path

from experiments.tracking.client import client

KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
VIEW_KEY = "comparison"
VIEW_NAME = "Comparison (experiments)"

# What a run varied, then what it gave: the runs table's columns, in this order.
VARIED = ["backbone.name", "strategy.name", "augmentation.name"]
RESULTS = ["best_val_accuracy", "test_accuracy", "train_time_s"]


def experiment_link(base_url: str, experiment_id: str) -> str:
    """The UI's address of an experiment's runs, in the comparison view, as model training."""
    return (
        f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs"
        f"?workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"
    )


def column(kind: str, key: str) -> str:
    """A runs-table column as the UI names it (`params.`, `metrics.`, `attributes.`)."""
    return f"{kind}.`{key}`"


def prepare_experiment(experiment_id: str, swept: list[str] = ()) -> None:
    """Mark an experiment as model training and (re)write its comparison view, adding the
    swept param columns to what the view holds already (a user's override of it included).

    Not the expanded rows: the UI takes those from the browser alone, never from a view."""
    tags = client().get_experiment(experiment_id).tags
    state = _view_state(tags.get(VIEW_TAG_PREFIX + VIEW_KEY))
    columns = state["selectedColumns"]
    wanted = [column("params", key) for key in [*VARIED, *swept]] + [
        column("metrics", key) for key in RESULTS
    ]
    # Columns a user added first (attributes, tags), then the params (the varied ones, then the
    # swept ones), then the results.
    every = list(dict.fromkeys(columns + wanted))
    kinds = [[c for c in every if not c.startswith(("params.", "metrics."))]]
    kinds += [[c for c in every if c.startswith(kind)] for kind in ("params.", "metrics.")]
    state["selectedColumns"] = [c for kind in kinds for c in kind]
    if tags.get(KIND_TAG) != MODEL_TRAINING:
        _set_tag(experiment_id, KIND_TAG, MODEL_TRAINING)
    if state["selectedColumns"] != columns:
        _set_tag(experiment_id, VIEW_TAG_PREFIX + VIEW_KEY, _saved(state))


def _set_tag(experiment_id: str, key: str, value: str) -> None:
    """Set an experiment tag that other processes may be setting at the same moment: the workers
    of one sweep all start by preparing its experiment. On PostgreSQL, MLflow's first write of a
    tag is an insert, and the loser of that race gets a unique-key error; its second try is an
    update, which succeeds."""
    from mlflow.exceptions import MlflowException

    try:
        client().set_experiment_tag(experiment_id, key, value)
    except MlflowException:
        if key not in client().get_experiment(experiment_id).tags:
            raise
        client().set_experiment_tag(experiment_id, key, value)


def _view_state(saved: str | None) -> dict:
    """The state of our saved view, or a new one: newest runs first, no columns yet."""
    if saved:
        try:
            encoded = json.loads(saved)["state"].split(";", 1)[1]
            return json.loads(zlib.decompress(base64.b64decode(encoded)))
        except (ValueError, KeyError, IndexError, zlib.error):  # not ours to read: write anew
            pass
    return {
        "searchFilter": "",
        "orderByKey": "attributes.start_time",
        "orderByAsc": False,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "datasetsFilter": [],
        "modelVersionFilter": "All Runs",
        "selectedColumns": [],
        "hideEmptyCharts": True,
    }


def _saved(state: dict) -> str:
    """A view as the UI's "Save view" writes it: its name and its state, deflated."""
    now = int(time.time() * 1000)
    packed = base64.b64encode(zlib.compress(json.dumps(state).encode())).decode()
    return json.dumps(
        {"name": VIEW_NAME, "createdAt": now, "updatedAt": now, "state": f"deflate;{packed}"}
    )


def ui_command(uri: str, artifact_root: Path | None, host: str, port: int) -> list[str]:
    """MLflow's UI on a local store, as a command line."""
    import shutil
    import sys

    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    command = [mlflow, "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    if artifact_root is not None:
        command += ["--default-artifact-root", str(artifact_root)]
    return command
