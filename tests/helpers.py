"""Reading back what a run recorded."""

from __future__ import annotations

from pathlib import Path


def client_for(root: Path):
    """An MlflowClient on the default sqlite store under `root`."""
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{root}/mlruns/mlflow.db")
    return MlflowClient()


def runs_of(root: Path, experiment: str, filter_string: str = ""):
    """Every run of an experiment in the store under `root`, oldest first."""
    client = client_for(root)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r} under {root}"
    runs = client.search_runs([found.experiment_id], filter_string=filter_string)
    return sorted(runs, key=lambda r: r.info.start_time)
