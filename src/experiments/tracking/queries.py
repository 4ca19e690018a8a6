"""Reading the store: runs as rows or as a table, a metric's history, a logged model or text.

`compare`, `runs`, `evaluate` and the benchmarks read what they need through these; with `uri`
a function reads that store, else the one this process points at (`store.open_store`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from experiments.tracking.client import client


@dataclass
class RunRow:
    """One MLflow run as plain values."""

    run_id: str
    experiment_id: str
    experiment: str
    name: str
    status: str
    start_time: int | None
    end_time: int | None
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def duration_s(self) -> float | None:
        if self.start_time is None or self.end_time is None:
            return None
        return (self.end_time - self.start_time) / 1000


def experiments(uri: str | None = None) -> dict[str, str]:
    """The store's experiments: id -> name."""
    return {e.experiment_id: e.name for e in client(uri).search_experiments()}


def run_rows(
    filter_string: str = "",
    experiment: str | None = None,
    order_by: list[str] | None = None,
    uri: str | None = None,
) -> list[RunRow]:
    """The runs matching `filter_string`, in `experiment` (a name) or in every experiment."""
    mlflow_client = client(uri)
    names = experiments(uri)
    ids = [i for i, name in names.items() if experiment is None or name == experiment]
    if not ids:
        return []
    runs = mlflow_client.search_runs(
        ids, filter_string=filter_string, order_by=order_by, max_results=50000
    )
    return [_row(run, names) for run in runs]


def find_run(run_id: str, uri: str | None = None) -> RunRow | None:
    """The run `run_id`, or the one run whose id starts with it (the 8 characters tables
    show); None when the store has no such run."""
    import re

    from mlflow.exceptions import MlflowException

    try:
        return _row(client(uri).get_run(run_id), experiments(uri))
    except MlflowException:
        pass
    if not re.fullmatch(r"[0-9a-f]{6,31}", run_id):
        return None
    found = run_rows(f"attributes.run_id LIKE '{run_id}%'", uri=uri)
    if len(found) > 1:
        from experiments.core.errors import ExperimentError

        raise ExperimentError(
            f"run id {run_id} starts {len(found)} runs' ids ({', '.join(r.run_id for r in found)})"
            f"; give more of it"
        )
    return found[0] if found else None


def finished_member(parent_id: str, identity: str) -> RunRow | None:
    """The FINISHED run of `identity` nested under the group run `parent_id`, or None."""
    from experiments.tracking import tags as T

    rows = run_rows(
        f"tags.{T.PARENT_RUN} = '{parent_id}' and tags.{T.IDENTITY} = '{identity}' "
        "and attributes.status = 'FINISHED'"
    )
    return rows[0] if rows else None


def runs_table(
    filter_string: str = "",
    experiment_names: list[str] | None = None,
    experiment_ids: list[str] | None = None,
    users_filter: str | None = None,
):
    """The matching runs as a pandas DataFrame, one row each, with MLflow's columns
    (`run_id`, `status`, `tags.<name>`, `params.<name>`, `metrics.<name>`). A filter MLflow
    cannot parse is one line naming `users_filter` (the part the user gave), else the whole."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from experiments.core.errors import ExperimentError

    if experiment_ids is None:
        experiment_names = experiment_names or list(experiments().values())
    try:
        return mlflow.search_runs(
            experiment_names=experiment_names if experiment_ids is None else None,
            experiment_ids=experiment_ids,
            filter_string=filter_string,
            output_format="pandas",
        )
    except MlflowException as err:
        if not filter_string or err.error_code != "INVALID_PARAMETER_VALUE":
            raise
        first = (str(err.message).strip().splitlines() or [""])[0]
        example = "params.`backbone.name` = 'vgg19' and metrics.test_accuracy > 0.9"
        given = users_filter or filter_string
        raise ExperimentError(
            f'filter {given!r} is not an MLflow search filter ({first}); e.g. "{example}"'
        ) from None


def metric_history(run_id: str, key: str, uri: str | None = None) -> list[tuple[int, float]]:
    """(step, value) of every logged value of a metric, in logging order."""
    return [(m.step, m.value) for m in client(uri).get_metric_history(run_id, key)]


def load_text(artifact_uri: str) -> str:
    """The text of a logged artifact (e.g. `runs:/<id>/config/config.yaml`)."""
    import mlflow.artifacts

    return mlflow.artifacts.load_text(artifact_uri)


def _row(run, names: dict[str, str]) -> RunRow:
    info, data = run.info, run.data
    return RunRow(
        run_id=info.run_id,
        experiment_id=info.experiment_id,
        experiment=names.get(info.experiment_id, info.experiment_id),
        name=info.run_name,
        status=info.status,
        start_time=info.start_time,
        end_time=info.end_time,
        tags=dict(data.tags),
        params=dict(data.params),
        metrics=dict(data.metrics),
    )


@dataclass
class Predictions:
    """A run's stored per-image predictions of one split (`evaluation/predictions_<split>.*`)."""

    digest: str  # of the split's files and labels: equal digests, the same images in order
    labels: list[str]
    predicted: list[str]

    @property
    def correct(self):
        import numpy as np

        return np.array(self.labels) == np.array(self.predicted)


def predictions(run_id: str, split: str = "test") -> Predictions:
    """The per-image predictions a run stored for `split`; one line when it stored none."""
    import csv
    import io
    import json

    from experiments.core.errors import ExperimentError

    base = f"runs:/{run_id}/evaluation/predictions_{split}"
    try:
        meta = json.loads(load_text(f"{base}.json"))
        rows = list(csv.DictReader(io.StringIO(load_text(f"{base}.csv"))))
    except Exception:
        raise ExperimentError(
            f"run {run_id} keeps no per-image predictions of its {split} split "
            f"(evaluation/predictions_{split}.csv; runs recorded before they were kept have "
            f"none): evaluate its model again, python -m experiments.evaluate "
            f"model=runs:/{run_id}/model split={split}, and compare that run"
        ) from None
    return Predictions(meta["digest"], [r["label"] for r in rows], [r["predicted"] for r in rows])
