"""The reference-style comparison table from MLflow: `python -m experiments.compare [EXPERIMENT]`,
or the trials of one sweep: `python -m experiments.compare --sweep PARENT_RUN_ID`.

Prints the table, saves it as Markdown and CSV, and draws accuracy against train time per
configuration. Runs are read through `experiments.tracking` (`experiments.comparison`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from experiments import compose_project_config
from experiments.core.errors import ExperimentError


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
    parser.add_argument(
        "--significance",
        nargs=2,
        metavar=("GROUP_A", "GROUP_B"),
        help="two groups' parent run ids (trainer.repeats): do they differ in --metric?",
    )
    parser.add_argument("--metric", default="test_accuracy", help="default: %(default)s")
    parser.add_argument(
        "--sort",
        default="val_accuracy",
        help="the column the table is sorted by, best first (default: %(default)s, the saved "
        "model's); a test_* column needs --allow-test-selection",
    )
    parser.add_argument(
        "--allow-test-selection",
        action="store_true",
        help="let --sort rank by a test column, knowingly (refused by default)",
    )
    args = parser.parse_args(argv)
    import pandas as pd

    from experiments import tracking
    from experiments.comparison.selection import choosing_by_test
    from experiments.comparison.significance import significance
    from experiments.comparison.tables import (
        COLUMNS,
        INTERVAL_COLUMNS,
        comparison_table,
        save_outputs,
        shown,
        sweep_table,
    )

    project = compose_project_config()
    try:
        if args.sort not in COLUMNS or args.sort in INTERVAL_COLUMNS:
            raise ExperimentError(
                f"--sort {args.sort} is not a column; use one of "
                f"{', '.join(c for c in COLUMNS if c not in INTERVAL_COLUMNS)}"
            )
        if args.sort.startswith("test_") and not args.allow_test_selection:
            raise ExperimentError(
                choosing_by_test(f"--sort {args.sort}", "add --allow-test-selection")
            )
        tracking.open_store(
            args.tracking_uri or str(project.tracking.uri), project.tracking.outbox_dir
        )
        if args.significance:
            print(significance(*args.significance, args.metric))
            return 0
        if args.sweep:
            table, summary = sweep_table(args.sweep, args.pruned, args.sort)
        else:
            table = comparison_table(args.experiments, args.filter, args.pruned, args.sort)
            summary = None
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
        print(shown(table).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if summary:
        print(summary)
    print(
        f"sorted by {args.sort}; val_accuracy is the saved model's; test_ci95: Wilson's 95% "
        f"interval over the test images for a run, Student's t over the members for a group (n > 1)"
    )
    print("saved: " + ", ".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    from experiments.cli import exit_with

    exit_with(main)
