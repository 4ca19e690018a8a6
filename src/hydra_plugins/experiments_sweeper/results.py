"""What a study gives back: its objectives and their directions, the values a job returned,
and the results, trial table and plots written when the sweep ends."""

import logging
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from experiments.sweeps.plugin import T, uninterrupted
from hydra_plugins.experiments_sweeper import SweepError
from hydra_plugins.experiments_sweeper.workers import retried_numbers

log = logging.getLogger(__name__.rsplit(".", 1)[0] + ".optuna_sweeper")

# Metrics minimized when hydra.sweeper.direction is not given (names holding one of these words,
# or seconds: `_s`); any other is maximized.
MINIMIZED = ("loss", "time", "params", "size", "rss", "error")


def metric_names(config: DictConfig) -> list[str] | None:
    """The names of the job's objectives (`optimized_metric`), or None when it has none."""
    metric = config.get("optimized_metric")
    if metric is None:
        return None
    return [str(m) for m in metric] if isinstance(metric, ListConfig | list) else [str(metric)]


def study_directions(direction: Any, metrics: list[str] | None) -> list[str]:
    """One direction per objective: as given, or from each metric's name (minimize a loss, a
    time, a size or a parameter count; maximize the rest), or minimize (hydra-optuna-sweeper's
    default) for a task without `optimized_metric`."""
    if direction is None:
        if not metrics:
            return ["minimize"]
        return ["minimize" if any(word in m for word in MINIMIZED) else "maximize" for m in metrics]
    given = list(direction) if isinstance(direction, ListConfig | list | tuple) else [direction]
    given = [str(getattr(d, "name", d)) for d in given]
    if bad := [d for d in given if d not in ("minimize", "maximize")]:
        raise SweepError(f"hydra.sweeper.direction={bad[0]}: use minimize or maximize")
    if metrics and len(given) != len(metrics):
        raise SweepError(
            f"hydra.sweeper.direction gives {len(given)} direction(s) for the {len(metrics)} "
            f"metric(s) of optimized_metric={metrics}: give one per metric"
        )
    return given


def objective_values(returned: Any, objectives: int) -> list[float]:
    """The job's return value as one float per objective; ValueError says what is wrong."""
    many = isinstance(returned, list | tuple | ListConfig)
    if objectives == 1 and not many:
        values = [returned]
    elif objectives > 1 and many:
        values = list(returned)
    else:
        shape = "a number" if objectives == 1 else f"a list or tuple of {objectives} numbers"
        raise ValueError(
            f"the job returned {returned!r}; a study of {objectives} objective(s) needs {shape}"
        )
    if len(values) != objectives:
        raise ValueError(
            f"the job returned {len(values)} value(s), {returned!r}, for {objectives} objectives"
        )
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"the job returned {returned!r}, which is not numeric") from None


def tell(study, trial, **outcome):
    """study.tell, whose GridSampler stops the study once the grid is covered: outside
    study.optimize that stop raises, after the trial's state is stored. The sweep ends on its
    own then, as n_trials is capped at the grid's size."""
    try:
        study.tell(trial, **outcome)
    except RuntimeError as err:
        if "Study.stop" not in str(err):
            raise
    return study.get_trials(deepcopy=False)[trial.number].state


def study_results(study, metrics: list[str] | None) -> dict[str, Any]:
    """optimization_results.yaml as hydra-optuna-sweeper writes it: the best params and value,
    or the Pareto front (`solutions`) of a multi-objective study."""
    from optuna.trial import TrialState

    results: dict[str, Any] = {"name": "optuna"}
    if metrics:
        results["metric"] = metrics[0] if len(metrics) == 1 else metrics
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return results
    if len(study.directions) == 1:
        log.info("best value %.4f with %s", study.best_value, study.best_params)
        return results | {"best_params": dict(study.best_params), "best_value": study.best_value}
    front = study.best_trials
    log.info("%d trial(s) on the Pareto front", len(front))
    for t in front:
        log.info("    trial %d: values %s, params %s", t.number, t.values, t.params)
    return results | {
        "directions": [d.name.lower() for d in study.directions],
        "solutions": [{"params": dict(t.params), "values": list(t.values)} for t in front],
    }


def plots(study, sweep_dir: Path, metrics: list[str] | None) -> list[Path]:
    """Optuna's plots of the study as PNG files: the history, importances and parallel
    coordinates of one objective, or the Pareto front of several."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    if len(study.directions) > 1:
        names = metrics if metrics and len(metrics) == len(study.directions) else None
        wanted = {
            "pareto_front": lambda s: optuna_plots.plot_pareto_front(s, target_names=names),
        }
    else:
        wanted = {
            "optimization_history": optuna_plots.plot_optimization_history,
            "param_importances": optuna_plots.plot_param_importances,
            "parallel_coordinate": optuna_plots.plot_parallel_coordinate,
        }
    saved = []
    for name, plot in wanted.items():
        # Best-effort: a plot never fails a sweep whose trials have ended. Their warnings
        # (Optuna's importance evaluator on a small or flat study, an empty legend) say nothing
        # about the sweep, and under `python -W error` they would end it; an error is one line.
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = plot(study)
                figure = (axes.flat[0] if hasattr(axes, "flat") else axes).get_figure()
                path = sweep_dir / f"{name}.png"
                figure.savefig(path, dpi=100, bbox_inches="tight")
                plt.close(figure)
        except (ValueError, RuntimeError) as err:  # e.g. importances need 2+ complete trials
            log.info("no %s plot: %s", name, err)
            continue
        except Exception as err:  # noqa: BLE001 - anything else: one line, the sweep goes on
            log.warning("no %s plot: %s: %s", name, type(err).__name__, err)
            continue
        saved.append(path)
    return saved


@uninterrupted
def write_results(study, sweep_dir: Path, metrics: list[str] | None) -> None:
    from experiments.sweeps.plugin import log_study, redact, redacted, tag_trial_runs

    frame = study.trials_dataframe(
        attrs=("number", "state", "value", "duration", "params", "user_attrs")
    )
    if frame.empty:
        return
    # Stale trials run again as a retry: the retry's row is the trial's.
    frame = frame[~frame["number"].isin(retried_numbers(study.trials))]
    if "user_attrs_surplus" in frame:  # asks discarded as duplicates never ran
        frame = frame[frame["user_attrs_surplus"].isna()].drop(columns="user_attrs_surplus")
    frame = frame.drop(columns=[c for c in frame if c.startswith("user_attrs_owner_")])
    results = study_results(study, metrics)
    if "solutions" in results:
        front = {t.number for t in study.best_trials}
        frame["pareto"] = frame["number"].isin(front)
        tags = {n: {T.PARETO: str(n in front).lower()} for n in frame["number"]}
        tag_trial_runs(study.study_name, tags)
    # Without passwords: a URL with credentials among the trials' params or attributes.
    (sweep_dir / "trials.csv").write_text(redact(frame.to_csv(index=False)))
    OmegaConf.save(OmegaConf.create(redacted(results)), sweep_dir / "optimization_results.yaml")
    log_study(study, sweep_dir, results, plots(study, sweep_dir, metrics))
