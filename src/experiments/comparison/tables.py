"""The reference-style comparison table of experiments, or of one sweep's trials, read from
MLflow through `experiments.tracking`; shown with a group's mean ± std (n), and saved as
Markdown, CSV and a plot of accuracy against train time."""

from __future__ import annotations

from pathlib import Path

from experiments.core.errors import ExperimentError
from experiments.tracking import tags as T

# The column a table is sorted by unless --sort names another.
SORT = "val_accuracy"

COLUMNS = {  # table column -> MLflow field
    "task": f"tags.{T.TASK}",
    "backbone": f"tags.{T.BACKBONE}",
    "strategy": f"tags.{T.STRATEGY}",
    "augmentation": f"tags.{T.AUGMENTATION}",
    "val_accuracy": "metrics.saved_val_accuracy",  # the saved model's (best_val_accuracy before)
    "test_accuracy": "metrics.test_accuracy",
    # A single run's: Wilson's over its test images; a group's: Student's t over its members.
    "test_ci95_low": "metrics.test_accuracy_ci95_low",
    "test_ci95_high": "metrics.test_accuracy_ci95_high",
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
    "warm_start": f"tags.{T.WARM_START}",  # an enqueued configuration's source
}


def comparison_table(
    experiments: list[str] | None, filter_string: str = "", pruned=False, sort: str = SORT
):
    """One row per finished training run, best test accuracy first. Pruned trials are left out
    (their partial runs have no test metrics), or kept with `pruned` and marked."""
    from experiments import tracking

    known = list(tracking.experiments().values())
    if unknown := [name for name in experiments or [] if name not in known]:
        raise ExperimentError(
            f"no experiment named {', '.join(unknown)} in this store; it has "
            f"{', '.join(known) or 'none'} (options such as --out go before the names)"
        )
    names = experiments or known
    wanted = " and ".join(f for f in ("attributes.status = 'FINISHED'", filter_string) if f)
    runs = tracking.runs_table(wanted, experiment_names=names, users_filter=filter_string)
    if runs.empty:
        raise ExperimentError(
            f"no finished runs in experiment(s) {', '.join(names) or '(none)'}"
            f"{' matching ' + filter_string if filter_string else ''}; train some first"
        )
    return table_of(runs, pruned, sort)


def sweep_table(parent_id: str, pruned=False, sort: str = SORT):
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
    table = table_of(runs, pruned, sort)
    several = "," in tags.get(T.OPTUNA_DIRECTIONS, "")  # a Pareto front only with objectives
    for column, field in TRIAL_COLUMNS.items():
        if column == "warm_start" and field not in runs:
            continue
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
    if T.WARM_START_TRIALS in tags:
        brought = int(tags[T.WARM_START_TRIALS])
        summary += f"; warm-started from {tags.get(T.WARM_START)}" + (
            f" ({brought} trial(s) brought, not listed: they ran elsewhere)" if brought else ""
        )
        if T.BEST_TRIAL in tags and tags[T.BEST_TRIAL] not in set(table["trial"]):
            summary = summary.replace(": ", " (brought by the warm start): ", 1)
    return table, summary


# Intervals are not averaged over a group's members: a group's row shows its own, over them.
INTERVAL_COLUMNS = ("test_ci95_low", "test_ci95_high")
METRIC_COLUMNS = [
    c for c, field in COLUMNS.items() if field.startswith("metrics.") and c not in INTERVAL_COLUMNS
]


def table_of(runs, pruned: bool, sort: str = SORT):
    """The comparison columns of `runs` (training runs only), the best by `sort` first (the saved
    model's validation accuracy: never the test split's, which would choose by test). A group
    (repeats) is one row: each metric's mean, with its std in `<column>_std` and its size in
    `n`; its members are not rows of their own."""
    # Training runs only: not sweep parents, not re-evaluations.
    for tag in (f"tags.{T.SWEEP}", f"tags.{T.RUN_TYPE}"):
        if tag in runs:
            runs = runs[runs[tag].isna()]
    runs = runs.copy()
    # Runs recorded before saved_val_accuracy existed show their best epoch's, which they kept
    # unless trainer.restore_best=false.
    for suffix in ("", "_mean", "_std"):
        saved, best = f"metrics.saved_val_accuracy{suffix}", f"metrics.best_val_accuracy{suffix}"
        if best in runs:
            runs[saved] = runs[best] if saved not in runs else runs[saved].fillna(runs[best])
    group_field = f"tags.{T.GROUP}"
    groups = runs[runs[group_field].eq("true")] if group_field in runs else runs.iloc[:0]
    if not groups.empty:
        runs = runs[~runs[f"tags.{T.PARENT_RUN}"].isin(groups["run_id"])].copy()
        in_group = runs["run_id"].isin(groups["run_id"])
        for field in (COLUMNS[column] for column in METRIC_COLUMNS):
            if f"{field}_mean" in runs:  # a group's row shows its mean
                runs[field] = runs[f"{field}_mean"].where(in_group, runs.get(field))
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
        table[column] = table[column].astype("Float64").round().astype("Int64")
    is_group = runs[group_field].eq("true") if group_field in runs else runs["run_id"].isna()
    table["n"] = [int(runs.loc[i, f"tags.{T.MEMBERS}"]) if is_group[i] else 1 for i in runs.index]
    for column in METRIC_COLUMNS:
        field = f"metrics.{COLUMNS[column][len('metrics.') :]}_std"
        table[f"{column}_std"] = runs[field] if field in runs else float("nan")
    from experiments.comparison.selection import LOWER_IS_BETTER

    lowest = any(word in sort for word in LOWER_IS_BETTER)
    return table.sort_values(sort, ascending=lowest, na_position="last")


def shown(table):
    """The table as printed and written to Markdown: a group's metrics as `mean ± std (n)`."""
    import pandas as pd

    out = table.copy()
    for column in METRIC_COLUMNS + ["time_per_epoch_s"]:
        std = table.get(f"{column}_std")
        if std is None:
            continue
        out[column] = [
            ""  # a pruned trial has no test metrics
            if pd.isna(m)
            else f"{m:.4g} ± {s:.2g} ({n})"
            if n > 1
            and not pd.isna(s)
            and s > 1e-6 * max(1.0, abs(m))  # not float32 rounding noise
            else f"{m:.4g}"
            for m, s, n in zip(table[column], std, table["n"], strict=True)
        ]
    return out.drop(columns=[c for c in out if c.endswith("_std")])


def save_outputs(table, outdir: Path, stem: str) -> list[Path]:
    """The table as Markdown and CSV, and a PNG of accuracy against train time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outdir.mkdir(parents=True, exist_ok=True)
    markdown, csv, png = (outdir / f"{stem}.{ext}" for ext in ("md", "csv", "png"))
    markdown.write_text(shown(table).to_markdown(index=False, floatfmt=".4g") + "\n")
    table.to_csv(csv, index=False)
    fig, ax = plt.subplots(figsize=(8, 5))
    plotted = table.dropna(subset=["train_time_s", "test_accuracy"])  # pruned trials have none
    for _, row in plotted.iterrows():
        label = f"{row.task}/{row.backbone}/{row.strategy}/{row.augmentation}"
        if row.n > 1:  # a group: its mean with error bars of one std
            label += f" (n={row.n})"
            ax.errorbar(
                row.train_time_s,
                row.test_accuracy,
                xerr=row.train_time_s_std,
                yerr=row.test_accuracy_std,
                fmt="o",
                capsize=3,
            )
            continue
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
