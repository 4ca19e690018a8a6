"""What an earlier sweep or experiment found, read from the MLflow store for a sweep's warm start
(`hydra.sweeper.warm_start={run: ID}` or `{experiment: NAME}`): each finished result's config
values and the value its job returned to its sweeper."""

from __future__ import annotations

import json
from dataclasses import dataclass

from experiments.core.errors import ExperimentError
from experiments.tracking import tags as T
from experiments.tracking.queries import RunRow, experiments, find_run, run_rows


@dataclass(frozen=True)
class Result:
    run_id: str
    params: dict[str, str]  # the run's config, flattened (`optimizer.lr`: "0.001")
    value: float | list[float]  # what its job returned


def finished_results(run: str | None = None, experiment: str | None = None) -> list[Result]:
    """The results of a sweep's parent run (`run`, an id or its first 8 characters), or of
    every finished run of `experiment` that returned a value: single runs and groups, not a
    group's members (their group's mean is the result). Pruned runs are left out."""
    if run is not None:
        parent = find_run(str(run))
        if parent is None:
            raise ExperimentError(
                f"warm_start run {run}: no such run in the store; give a sweep's parent run id "
                f"(python -m experiments.runs lists them)"
            )
        if parent.tags.get(T.SWEEP) != "true":
            raise ExperimentError(
                f"warm_start run {run}: {parent.name!r} is not a sweep's parent run; give one "
                f"(python -m experiments.runs lists them), or experiment=NAME for all its runs"
            )
        rows = run_rows(f"tags.{T.PARENT_RUN} = '{parent.run_id}'", experiment=parent.experiment)
    else:
        names = sorted(experiments().values())
        if experiment not in names:
            raise ExperimentError(
                f"warm_start experiment {experiment!r}: no such experiment in the store; "
                f"it has {', '.join(names)}"
            )
        rows = run_rows("", experiment=str(experiment))
        groups = {r.run_id for r in rows if r.tags.get(T.GROUP) == "true"}
        rows = [r for r in rows if r.tags.get(T.PARENT_RUN) not in groups]
    return [result for row in rows if (result := _result(row)) is not None]


def _result(row: RunRow) -> Result | None:
    if row.status != "FINISHED" or row.tags.get(T.PRUNED) or T.RETURNED_VALUE not in row.tags:
        return None
    try:
        value = json.loads(row.tags[T.RETURNED_VALUE])
    except ValueError:
        return None
    if not isinstance(value, int | float | list):
        return None
    return Result(row.run_id, dict(row.params), value)
