"""The MLflow client of a store, and what a lost tracking server looks like.

Below `store` and `outbox`, which both use it.
"""

from __future__ import annotations

import os
from pathlib import Path

from experiments.core.secrets import redact

LOCAL_SCHEMES = ("sqlite:", "file:", "/")
# MLflow's HTTP client retries a failed call for minutes by default; a lost server must cost
# seconds, since every call is then kept in the outbox instead. The user's own settings win.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
}


# The store this process was pointed at (point_at), if any.
_pointed: list[str] = []


def is_local(uri: str) -> bool:
    return uri.startswith(LOCAL_SCHEMES)


def sqlite_uri(folder: Path) -> str:
    """The URI of an sqlite store in `folder`, as `tracking.uri` names the project's."""
    return f"sqlite:///{Path(folder) / 'mlflow.db'}"


def client(uri: str | None = None):
    """An MLflow client of `uri`, or of the store this process was pointed at (`point_at`).

    Never of MLflow's default store: that is `mlflow.db` in the working directory, outside every
    `paths.*`, so a call before the store is chosen is a programming error here.
    """
    from mlflow.tracking import MlflowClient

    if uri:
        return MlflowClient(tracking_uri=uri)
    # mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI, but only when the URI changes.
    if not _pointed and "MLFLOW_TRACKING_URI" not in os.environ:
        raise RuntimeError(
            "no MLflow store chosen yet: call tracking.set_tracking() or open_store() first "
            "(MLflow's default would write mlflow.db into the working directory)"
        )
    return MlflowClient()


def point_at(uri: str) -> None:
    import mlflow

    if not is_local(uri):
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
    # MLflow draws a download bar for each file of a model it loads; our commands say in one
    # line what they load, and the bars read as noise in a log.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if redact(uri) != uri:  # MLflow prints each run's URL, password and all
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    mlflow.set_tracking_uri(uri)
    _pointed[:] = [uri]


def unreachable_message(uri: str, err: BaseException | str) -> str:
    return (
        f"cannot reach the MLflow store tracking.uri={redact(uri)} "
        f"({redact(str(err).splitlines()[0])[:300]}); "
        f"start the server or fix tracking.uri / MLFLOW_TRACKING_URI"
    )


def unreachable(err: BaseException) -> bool:
    """Whether `err` says the tracking server could not be reached (not a refused request)."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(err, (requests.RequestException, ConnectionError, TimeoutError)):
        return True
    text = str(err)
    return isinstance(err, MlflowException) and (
        "Max retries exceeded" in text
        or "Connection" in text
        or "timed out" in text
        or "API request to" in text
    )
