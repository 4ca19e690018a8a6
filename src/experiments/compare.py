"""The reference-style comparison table from MLflow: `python -m experiments.compare [EXPERIMENT]`,
or the trials of one sweep: `python -m experiments.compare --sweep PARENT_RUN_ID`.

Prints the table, saves it as Markdown and CSV, and draws accuracy against train time per
configuration. Runs are read through `experiments.tracking`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from experiments import compose_project_config
from experiments.errors import ExperimentError
from experiments.tracking import tags as T

COLUMNS = {  # table column -> MLflow field
    "task": f"tags.{T.TASK}",
    "backbone": f"tags.{T.BACKBONE}",
    "strategy": f"tags.{T.STRATEGY}",
    "augmentation": f"tags.{T.AUGMENTATION}",
    "val_accuracy": "metrics.best_val_accuracy",
    "test_accuracy": "metrics.test_accuracy",
    "total_params": "metrics.total_params",
    "trainable_params": "metrics.trainable_params",
    "size_mb": "metrics.model_size_mb",
    "epochs": "metrics.epochs_run",
    "train_time_s": "metrics.train_time_s",
}


TRIAL_COLUMNS = {  # sweep table column -> MLflow field
    "trial": f"tags.{T.OPTUNA_TRIAL}",
    "state": f"tags.{T.OPTUNA_STATE}",
    "pareto": f"tags.{T.PARETO}",
}


def comparison_table(experiments: list[str] | None, filter_string: str = "", pruned=False):
    """One row per finished training run, best test accuracy first. Pruned trials are left out
    (their partial runs have no test metrics), or kept with `pruned` and marked."""
    from experiments import tracking

    names = experiments or list(tracking.experiments().values())
    wanted = " and ".join(f for f in ("attributes.status = 'FINISHED'", filter_string) if f)
    runs = tracking.runs_table(wanted, experiment_names=names)
    if runs.empty:
        raise ExperimentError(
            f"no finished runs in experiment(s) {', '.join(names) or '(none)'}"
            f"{' matching ' + filter_string if filter_string else ''}; train some first"
        )
    return table_of(runs, pruned)


def sweep_table(parent_id: str, pruned=False):
    """The trials of one sweep, given its MLflow parent run: a row per trial with its Optuna
    state and whether it is on the Pareto front, and a line naming the best trial or the front."""
    from experiments import tracking

    parent = tracking.find_run(parent_id)
    if parent is None:
        raise ExperimentError(f"--sweep {parent_id}: no such run in this store")
    tags = parent.tags
    if tags.get(T.SWEEP) != "true":
        raise ExperimentError(
            f"--sweep {parent_id}: run {parent.name!r} is not a sweep's parent run; give "
            f"the run id of a run tagged sweep=true"
        )
    runs = tracking.runs_table(
        f"tags.{T.PARENT_RUN} = '{parent_id}'", experiment_ids=[parent.experiment_id]
    )
    if runs.empty:
        raise ExperimentError(f"--sweep {parent_id}: the sweep has no trial runs yet")
    table = table_of(runs, pruned)
    several = "," in tags.get(T.OPTUNA_DIRECTIONS, "")  # a Pareto front only with objectives
    for column, field in TRIAL_COLUMNS.items():
        if column != "pareto" or several:
            table[column] = runs.loc[table.index, field] if field in runs else None
    for key in filter(None, tags.get(T.SWEPT, "").split(",")):  # what the sweep varied
        field = f"params.{key}"
        table[key] = runs.loc[table.index, field] if field in runs else None
    table = table.reset_index(drop=True)
    if T.BEST_TRIAL in tags:
        summary = f"best trial {tags[T.BEST_TRIAL]}: {tags.get(T.OPTIMIZED_METRIC, 'value')}=" + (
            f"{parent.metrics['best_value']:.4g}"
        )
    elif "pareto" in table and (table["pareto"] == "true").any():
        front = table[table["pareto"] == "true"]
        summary = (
            f"Pareto front ({tags.get(T.OPTIMIZED_METRIC, '')}; "
            f"{tags.get(T.OPTUNA_DIRECTIONS, '')}): trial(s) {', '.join(front['trial'])}"
        )
    else:
        summary = "no trial has completed"
    return table, summary


def table_of(runs, pruned: bool):
    """The comparison columns of `runs` (training runs only), best test accuracy first."""
    # Training runs only: not sweep parents, not re-evaluations.
    for tag in (f"tags.{T.SWEEP}", f"tags.{T.RUN_TYPE}"):
        if tag in runs:
            runs = runs[runs[tag].isna()]
    pruned_field = f"tags.{T.PRUNED}"
    marked = runs[pruned_field].eq("true") if pruned_field in runs else runs["run_id"].isna()
    if not pruned:
        runs = runs[~marked]
        if runs.empty and marked.any():
            raise ExperimentError(
                f"the {int(marked.sum())} finished run(s) found are all pruned trials, whose "
                f"partial runs hold no test metrics; add --pruned to list them"
            )
    missing = [field for field in COLUMNS.values() if field not in runs]
    runs = runs.assign(**{field: None for field in missing})
    table = runs[list(COLUMNS.values())].copy()
    table.columns = list(COLUMNS)
    table.insert(0, "run_name", runs[f"tags.{T.RUN_NAME}"])
    table.insert(1, "run_id", runs["run_id"].str[:8])
    if pruned:
        table["pruned"] = marked[runs.index]
    table["time_per_epoch_s"] = table["train_time_s"] / table["epochs"]
    for column in ("total_params", "trainable_params", "epochs"):
        table[column] = table[column].astype("Int64")
    return table.sort_values("test_accuracy", ascending=False, na_position="last")


def save_outputs(table, outdir: Path, stem: str) -> list[Path]:
    """The table as Markdown and CSV, and a PNG of accuracy against train time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outdir.mkdir(parents=True, exist_ok=True)
    markdown, csv, png = (outdir / f"{stem}.{ext}" for ext in ("md", "csv", "png"))
    markdown.write_text(table.to_markdown(index=False, floatfmt=".4g") + "\n")
    table.to_csv(csv, index=False)
    fig, ax = plt.subplots(figsize=(8, 5))
    plotted = table.dropna(subset=["train_time_s", "test_accuracy"])  # pruned trials have none
    for _, row in plotted.iterrows():
        label = f"{row.task}/{row.backbone}/{row.strategy}/{row.augmentation}"
        ax.scatter(row.train_time_s, row.test_accuracy)
        ax.annotate(
            label,
            (row.train_time_s, row.test_accuracy),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.set_xlabel("train time (s)")
    ax.set_ylabel("test accuracy")
    ax.set_title("accuracy against train time per configuration")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return [markdown, csv, png]


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m experiments.compare`."""
    parser = argparse.ArgumentParser(prog="python -m experiments.compare", description=__doc__)
    parser.add_argument("experiments", nargs="*", help="MLflow experiment names (default: all)")
    parser.add_argument(
        "--filter", default="", help="an MLflow search filter, e.g. \"tags.task = 'flowers'\""
    )
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="default: tracking.uri ($MLFLOW_TRACKING_URI, else the project's store in mlruns/)",
    )
    parser.add_argument("--out", default=None, help="output folder (default: paths.reports_dir)")
    parser.add_argument(
        "--sweep", default=None, metavar="PARENT_RUN_ID", help="the trials of one sweep"
    )
    parser.add_argument(
        "--pruned", action="store_true", help="keep pruned trials, marked (default: left out)"
    )
    args = parser.parse_args(argv)
    import pandas as pd

    from experiments import tracking

    project = compose_project_config()
    try:
        tracking.open_store(
            args.tracking_uri or str(project.tracking.uri), project.tracking.outbox_dir
        )
        if args.sweep:
            table, summary = sweep_table(args.sweep, args.pruned)
        else:
            table, summary = comparison_table(args.experiments, args.filter, args.pruned), None
    except ExperimentError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    table = table.reset_index(drop=True)
    if args.sweep:
        stem = f"comparison-sweep-{args.sweep[:8]}"
    else:
        stem = "comparison-" + ("-".join(args.experiments) or "all")
    files = save_outputs(table, Path(args.out or project.paths.reports_dir), stem)
    with pd.option_context("display.max_columns", None, "display.width", 200):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if summary:
        print(summary)
    print("saved: " + ", ".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
