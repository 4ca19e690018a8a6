"""MLflow's model registry: a run's model registered as a version of a named model, an alias
moved onto it, and any model URI (`runs:/`, `models:/name@alias`, `models:/name/3`) traced back
to the run that logged it."""

from __future__ import annotations

import json
import logging
import re

from experiments.core.errors import ExperimentError
from experiments.tracking.client import client
from experiments.tracking.queries import RunRow, find_run, load_text

log = logging.getLogger("experiments.tracking")

# MLflow caps a model version's tag value at 5,000 characters.
MAX_VERSION_TAG_CHARS = 5000


def has_model(run_id: str) -> bool:
    """Whether the run logged a model under `model/`."""
    return any(a.path == "model/MLmodel" for a in client().list_artifacts(run_id, "model"))


def logged_model_mb(run_id: str) -> float | None:
    """The size in MB of the Keras file of the model the run logged whole (its MLmodel and its
    Keras file both there), else None."""
    if not has_model(run_id):
        return None
    sizes = [
        a.file_size
        for a in client().list_artifacts(run_id, "model/data")
        if a.path.endswith(".keras")
    ]
    return sizes[0] / 1e6 if sizes and sizes[0] else None


def registered(model_uri: str) -> tuple[str, str | None, str | None] | None:
    """(name, alias, version) of `models:/<name>@<alias>` or `models:/<name>/<version>`, one of
    the two None; None for any other URI."""
    match = re.fullmatch(r"models:/([^@/]+)(?:@([^/]+)|/(\d+))", str(model_uri))
    return match.groups() if match else None


def check_model_uri(model_uri: str) -> None:
    """One line unless `model_uri` has the form of a model URI; reads nothing."""
    uri = str(model_uri)
    if not (re.fullmatch(r"runs:/([0-9a-f]{32})(/.*)?", uri) or registered(uri)):
        raise ExperimentError(
            f"{uri} is not a model URI; give runs:/<run id>/model, models:/<name>@<alias> or "
            f"models:/<name>/<version>"
        )


def require_model(run: RunRow) -> None:
    """One line if `run` logged no model."""
    if not has_model(run.run_id):
        raise ExperimentError(
            f"run {run.run_id} ({run.name}) logged no model (tracking.log_model=false); "
            f"train it again with tracking.log_model=true, or use another run"
        )


def source_run(model_uri: str) -> RunRow:
    """The run that logged the model at `model_uri`; one line naming what is unknown."""
    from mlflow.exceptions import MlflowException

    uri = str(model_uri)
    if match := re.fullmatch(r"runs:/([0-9a-f]{32})(/.*)?", uri):
        run = find_run(match.group(1))
        if run is None:
            raise ExperimentError(f"{uri}: no run {match.group(1)} in {client().tracking_uri}")
        return run
    check_model_uri(uri)
    name, alias, version = registered(uri)
    try:
        found = (
            client().get_model_version_by_alias(name, alias)
            if alias
            else client().get_model_version(name, version)
        )
    except MlflowException:
        known = sorted(m.name for m in client().search_registered_models())
        what = f"alias {alias!r}" if alias else f"version {version}"
        raise ExperimentError(
            f"{uri}: the registry has no {what} of a model {name!r} (registered models: "
            f"{', '.join(known) or 'none'}); register one with python -m experiments.register"
        ) from None
    run = find_run(found.run_id) if found.run_id else None
    if run is None:
        raise ExperimentError(f"{uri}: version {found.version} has no source run in this store")
    return run


def load_model(model_uri: str):
    """The Keras model logged at `model_uri` (`runs:/<id>/model`, `models:/<name>@<alias>`,
    `models:/<name>/<version>`). A registered one is read from where its version is stored:
    through `models:/`, MLflow writes a `registered_model_meta` file into a local store's model
    folder, so predicting from a read-only store would fail."""
    import mlflow.keras

    uri = str(model_uri)
    if (parts := registered(uri)) is not None:
        name = parts[0]
        uri = client().get_model_version_download_uri(name, version_of(uri))
    return mlflow.keras.load_model(uri)


def version_of(model_uri: str) -> str | None:
    """The registered version `models:/<name>@<alias>` or `models:/<name>/<n>` stands for."""
    parts = registered(model_uri)
    if parts is None:
        return None
    name, alias, version = parts
    return client().get_model_version_by_alias(name, alias).version if alias else version


def check_names(name: str, alias: str | None) -> None:
    """Refuse a model name or alias the registry would refuse, before anything is registered:
    MLflow checks an alias only once the version exists, which it would leave without one.
    MLflow's own rules, from its validation module (not part of its public API)."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils import validation

    checks = [("--name", name, validation._validate_model_name)]
    if alias is not None:
        checks += [
            ("--alias", alias, validation._validate_model_alias_name),
            ("--alias", alias, validation._validate_model_alias_name_reserved),
        ]
    for option, value, check in checks:
        try:
            check(value)
        except MlflowException as err:
            raise ExperimentError(f"{option} {value!r}: {err.message}") from None


# The tag of a version whose alias is not set yet: "ALIAS HOST:PID:START".
PENDING = "pending_alias"


def register(run_id: str, name: str, tags: dict[str, str], alias: str | None):
    """Register run `run_id`'s model as a new version of `name` with `tags`, and move `alias`
    onto it; (the new version, the version the alias left or None).

    MLflow sets an alias in a call of its own, after the version exists: a version registered
    for an alias carries `PENDING` (the alias and this process) until the alias is on it. One a
    killed register left is finished by the next register of the same run and alias, or
    removed by the next register of the name."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from experiments.core.processes import as_text, this_process

    mlflow_client = client()
    version = _settle_pending(name, run_id, alias)
    previous = None
    if alias:
        try:
            previous = mlflow_client.get_model_version_by_alias(name, alias).version
        except MlflowException:  # a new model, or a new alias
            previous = None
    if version is None:
        values = {k: str(v)[:MAX_VERSION_TAG_CHARS] for k, v in tags.items()}
        if alias:  # written with the version, in one transaction
            values[PENDING] = f"{alias} {as_text(this_process())}"
        version = mlflow.register_model(model_source(run_id), name, tags=values).version
    if alias:
        mlflow_client.set_registered_model_alias(name, alias, version)
        mlflow_client.delete_model_version_tag(name, version, PENDING)
    return version, previous


def _settle_pending(name: str, run_id: str, alias: str | None) -> str | None:
    """The version of `name` a killed register left for this run and alias, to be finished;
    the others killed registers left without their alias are removed, one line each. Versions
    of live processes, or of processes on other hosts, are left to them."""
    from mlflow.exceptions import MlflowException

    from experiments.core.processes import from_text

    try:
        versions = client().search_model_versions(f"name = '{name}'")
    except MlflowException:  # no such model yet
        return None
    finish = None
    for found in sorted(versions, key=lambda v: int(v.version)):
        wanted, _, text = (found.tags or {}).get(PENDING, "").partition(" ")
        owner = from_text(text)
        if owner is None or not owner.on_this_host() or owner.alive():
            continue
        if finish is None and found.run_id == run_id and wanted == alias:
            finish = found.version
            what = "giving it the alias now"
        else:
            client().delete_model_version(name, found.version)
            what = "removed it"
        log.warning(
            "version %s of %s was left without its alias %s by a register that was killed "
            "(pid %s): %s",
            found.version,
            name,
            wanted,
            owner.pid,
            what,
        )
    return finish


def model_source(run_id: str) -> str:
    """Where the run's model is: its MLflow 3 logged model (`models:/m-...`), or for a model sent
    from the outbox as plain artifacts, `runs:/<id>/model`."""
    outputs = client().get_run(run_id).outputs
    logged = [m.model_id for m in (outputs.model_outputs if outputs else [])]
    # A run logs one model; registering by its id spares MLflow's warning that runs:/ has no
    # artifacts under model/ (MLflow 3 keeps them with the logged model).
    return f"models:/{logged[-1]}" if logged else f"runs:/{run_id}/model"


def dataset_digests(run_id: str) -> dict[str, str]:
    """The digest of each dataset input of a run, by its context (the split)."""
    run = client().get_run(run_id)
    out = {}
    for item in run.inputs.dataset_inputs:
        context = next((t.value for t in item.tags if t.key == "mlflow.data.context"), "")
        out[context or item.dataset.name] = item.dataset.digest
    return out


def class_names(run: RunRow) -> list[str]:
    """The class names `run` recorded (`data/classes.json`), in its model's output order."""
    try:
        text = load_text(f"runs:/{run.run_id}/data/classes.json")
    except Exception as err:
        raise ExperimentError(
            f"run {run.run_id} recorded no class names (data/classes.json: "
            f"{str(err).splitlines()[0][:200]}); use a model logged by experiments.train"
        ) from None
    return list(json.loads(text)["class_names"])
