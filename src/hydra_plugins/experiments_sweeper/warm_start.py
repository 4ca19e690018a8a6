"""Warm starts: a study begins with what is already known (`hydra.sweeper.warm_start`).

Each source is a mapping, or a list of them:

- `{storage: URL, study_name: NAME}`: another Optuna study; its COMPLETE trials are added to this
  one with their values (Optuna's `add_trials`), where their params fit this search space;
- `{run: ID}` (a sweep's parent run, or its first 8 characters) or `{experiment: NAME}`: the
  finished runs in the MLflow store, their config values and the value their job returned;
- `{enqueue: [{key: value, ...}, ...]}`: configurations to try first (Optuna's
  `enqueue_trial`); keys left out are sampled.

Trials added from elsewhere are marked `warm_start` (where from) and `imported`; they never
count toward `n_trials`, nor toward `max_failure_rate`. Enqueued trials are this study's own
trials, run here, and count as Optuna counts them. A study records the sources it was started
from (user attr `warm_starts`), so the same command run again adds nothing twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from experiments.sweeps.plugin import (
    JOURNAL_PREFIX,
    ExperimentError,
    T,
    finished_results,
    open_storage,
    redact,
    tag_sweep_parent,
    uninterrupted,
)
from hydra_plugins.experiments_sweeper import SweepError
from hydra_plugins.experiments_sweeper.space import SearchSpace

log = logging.getLogger(__name__.rsplit(".", 1)[0] + ".optuna_sweeper")

KEYS = {"storage", "study_name", "run", "experiment", "enqueue"}
HOW = (
    "give {storage: URL, study_name: NAME}, {run: SWEEP_PARENT_RUN_ID}, {experiment: NAME} or "
    "{enqueue: [{key: value}, ...]}"
)


def sources(setting: Any) -> list[dict]:
    """The warm start's sources as plain dicts, each checked for its keys."""
    if setting is None:
        return []
    if isinstance(setting, DictConfig | ListConfig):
        setting = OmegaConf.to_container(setting, resolve=True)
    found = setting if isinstance(setting, list) else [setting]
    for source in found:
        if not isinstance(source, dict) or not source:
            raise SweepError(f"hydra.sweeper.warm_start={setting!r} is not a source; {HOW}")
        unknown = sorted(set(source) - KEYS)
        kinds = [k for k in ("storage", "run", "experiment", "enqueue") if k in source]
        if unknown or len(kinds) != 1 or (("storage" in source) != ("study_name" in source)):
            what = f"unknown key(s) {unknown}" if unknown else f"{sorted(source)} is not one source"
            raise SweepError(f"hydra.sweeper.warm_start: {what}; {HOW}")
    return found


@uninterrupted
def warm_start(
    study, space: SearchSpace, setting: Any, config: DictConfig, storage_url: str
) -> None:
    """Add each source not yet added to `study`; one line per source, and the sweep's MLflow
    parent run tagged with where the warm start came from and how many trials it brought."""
    done = dict(study.user_attrs.get("warm_starts", {}))
    for source in sources(setting):
        label = describe(source)
        if label in done:
            continue
        if "enqueue" in source:
            count = enqueue(study, space, source["enqueue"], label)
            log.info("warm start: %d configuration(s) to try first (enqueued)", count)
        else:
            trials, skipped = (
                from_study(study, source, storage_url)
                if "storage" in source
                else from_mlflow(source, config)
            )
            count = add(study, space, trials, label, skipped)
        done[label] = count
        study.set_user_attr("warm_starts", done)
    if done:
        imported = sum(n for label, n in done.items() if not label.startswith("enqueue"))
        tag_sweep_parent({T.WARM_START: "; ".join(done), T.WARM_START_TRIALS: imported})


def describe(source: dict) -> str:
    if "storage" in source:
        return f"study {source['study_name']} in {redact(str(source['storage']))}"
    if "run" in source:
        return f"run {source['run']}"
    if "experiment" in source:
        return f"experiment {source['experiment']}"
    text = json.dumps(source["enqueue"], sort_keys=True, default=str)
    return f"enqueue {hashlib.sha256(text.encode()).hexdigest()[:8]}"


def from_study(study, source: dict, storage_url: str) -> tuple[list, dict[str, int]]:
    """The COMPLETE trials of another study, as (params, values) pairs."""
    import optuna
    from optuna.trial import TrialState

    url, name = str(source["storage"]), str(source["study_name"])
    if name == study.study_name and url == storage_url:
        raise SweepError(f"hydra.sweeper.warm_start names this sweep's own study {name!r}")
    # Read, never created: a journal or sqlite file that is not there is a mistyped path.
    for prefix, kind in ((JOURNAL_PREFIX, "journal"), ("sqlite:///", "sqlite database")):
        if url.startswith(prefix) and not Path(url[len(prefix) :]).is_file():
            raise SweepError(f"hydra.sweeper.warm_start.storage={url}: no such {kind} file")
    try:
        storage = open_storage(url)
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    except Exception as err:  # noqa: BLE001 - any storage's failure, told in one line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise SweepError(
            f"hydra.sweeper.warm_start.storage={redact(url)} cannot be opened: {first}"
        ) from None
    if name not in names:
        raise SweepError(
            f"hydra.sweeper.warm_start: no study {name!r} in {redact(url)}; it holds "
            f"{', '.join(sorted(names)) or 'no study'}"
        )
    other = optuna.load_study(study_name=name, storage=storage)
    if list(other.directions) != list(study.directions):
        theirs = "/".join(d.name.lower() for d in other.directions)
        ours = "/".join(d.name.lower() for d in study.directions)
        raise SweepError(
            f"hydra.sweeper.warm_start: study {name!r} goes {theirs}, this one {ours}: their "
            f"values are not this sweep's objectives"
        )
    complete = other.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return [(t.params, t.values) for t in complete], {}


def from_mlflow(source: dict, config: DictConfig) -> tuple[list, dict[str, int]]:
    """The finished results of an MLflow sweep or experiment, as (params, values) pairs: the
    params as the runs recorded them (text), the values as their jobs returned them."""
    try:
        results = finished_results(run=source.get("run"), experiment=source.get("experiment"))
    except ExperimentError as err:
        raise SweepError(f"hydra.sweeper.{err}") from None
    except RuntimeError as err:  # no store chosen: not experiments.train
        raise SweepError(f"hydra.sweeper.warm_start from MLflow: {err}") from None
    metric = OmegaConf.select(config, "optimized_metric", default=None)
    ours = str(OmegaConf.to_container(metric) if OmegaConf.is_config(metric) else metric)
    pairs, skipped = [], {}
    for result in results:
        if result.params.get("optimized_metric", ours) != ours:
            skipped["another optimized_metric"] = skipped.get("another optimized_metric", 0) + 1
            continue
        values = result.value if isinstance(result.value, list) else [result.value]
        pairs.append((result.params, values))
    return pairs, skipped


def add(study, space: SearchSpace, trials: list, label: str, skipped: dict[str, int]) -> int:
    """Add the (params, values) pairs that fit the search space as COMPLETE trials; one line
    saying how many were added and why the others were not."""
    import optuna

    added = []
    for params, values in trials:
        fitted = fit(space, params)
        if fitted is None:
            skipped["outside this search space"] = skipped.get("outside this search space", 0) + 1
            continue
        if len(values) != len(study.directions):
            skipped["other objectives"] = skipped.get("other objectives", 0) + 1
            continue
        added.append(
            optuna.trial.create_trial(
                params=fitted,
                distributions=space.distributions,
                values=[float(v) for v in values],
                user_attrs={"warm_start": label, "imported": True},
            )
        )
    study.add_trials(added)
    why = "; ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))
    why = f", {why} skipped" if why else ""
    log.info("warm start from %s: %d trial(s) added%s", label, len(added), why)
    return len(added)


def fit(space: SearchSpace, params: dict[str, Any]) -> dict[str, Any] | None:
    """`params` as values of this space's distributions, or None when one is missing or
    outside. A run's params are text (`0.001`, `[256, 128]`); a study's trials are values."""
    fitted = {}
    for key, distribution in space.distributions.items():
        name = key.lstrip("+")  # `+key=...` adds a key: its param is `key`
        if key in params:
            value = params[key]
        elif name in params:
            value = params[name]
        else:
            return None
        value = as_value(distribution, value)
        if value is None:
            return None
        fitted[key] = value
    return fitted


def as_value(distribution, value: Any) -> Any:
    """`value` as a value of `distribution`, or None when it is not one."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(distribution, CategoricalDistribution):

        def spaced(v: Any) -> str:
            return str(v).replace(" ", "").lower()

        matches = [c for c in distribution.choices if c == value or spaced(c) == spaced(value)]
        return matches[0] if matches else None
    try:
        number = float(value)
        integral = isinstance(distribution, IntDistribution)
        if integral and not number.is_integer():
            return None
        internal = distribution.to_internal_repr(int(number) if integral else number)
    except (TypeError, ValueError):
        return None
    if not distribution._contains(internal):
        return None
    return distribution.to_external_repr(internal)


def enqueue(study, space: SearchSpace, configurations: Any, label: str) -> int:
    """Enqueue each configuration, refused in one line when a key is not searched or a value
    is outside its distribution."""
    if not isinstance(configurations, list) or not all(isinstance(c, dict) for c in configurations):
        raise SweepError(f"hydra.sweeper.warm_start.enqueue={configurations!r}: {HOW}")
    for index, configuration in enumerate(configurations):
        params = {}
        for key, value in configuration.items():
            searched = next(
                (k for k in space.distributions if k == key or k.lstrip("+") == key), None
            )
            if searched is None:
                raise SweepError(
                    f"hydra.sweeper.warm_start.enqueue[{index}]: {key} is not searched (the "
                    f"search space: {', '.join(space.distributions) or 'empty'})"
                )
            fitted = as_value(space.distributions[searched], value)
            if fitted is None:
                raise SweepError(
                    f"hydra.sweeper.warm_start.enqueue[{index}]: {key}={value} is outside the "
                    f"search space ({space.distributions[searched]})"
                )
            params[searched] = fitted
        study.enqueue_trial(params, user_attrs={"warm_start": label})
    return len(configurations)
