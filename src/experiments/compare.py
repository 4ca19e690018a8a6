"""The reference-style comparison table from MLflow: `python -m experiments.compare [EXPERIMENT]`,
or the trials of one sweep: `python -m experiments.compare --sweep PARENT_RUN_ID`, or whether
results differ: `python -m experiments.compare --significance A B [C ...] [--baseline A]`.

Prints the table, saves it as Markdown and CSV, and draws accuracy against train time per
configuration; `--format markdown|latex` prints and saves the table a paper prints instead.
Runs are read through `experiments.tracking` (`experiments.comparison`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from experiments import compose_project_config
from experiments.core.errors import ExperimentError


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m experiments.compare`."""
    from experiments.comparison.paper import COMPARISON_COLUMNS, FORMATS, SIGNIFICANCE_COLUMNS

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
        nargs="+",
        metavar="RUN",
        help="two or more groups' parent run ids (trainer.repeats, task.folds), or single runs: "
        "do they differ in --metric? More than two: every pair, or each against --baseline, "
        "with Holm-adjusted p-values",
    )
    parser.add_argument(
        "--baseline", default=None, metavar="RUN", help="with --significance: test each against it"
    )
    parser.add_argument(
        "--rope",
        type=float,
        default=None,
        help="with --significance: also the Bayesian correlated t-test with this region of "
        "practical equivalence, e.g. 0.01",
    )
    parser.add_argument("--metric", default="test_accuracy", help="default: %(default)s")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="text",
        help="markdown or latex: the table a paper prints, mean ± std (n), the best in bold, "
        "with --significance a mark on values that differ from the baseline (default: text)",
    )
    parser.add_argument(
        "--columns",
        default=None,
        help="with --format: the metrics shown, comma-separated (default: "
        f"{','.join(SIGNIFICANCE_COLUMNS)} with --significance, else "
        f"{','.join(COMPARISON_COLUMNS)})",
    )
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
    from experiments.comparison import paper
    from experiments.comparison.selection import choosing_by_test
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
        if args.significance or args.baseline or args.rope is not None:
            return significance(args, project)
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
    outdir = Path(args.out or project.paths.reports_dir)
    files = save_outputs(table, outdir, stem)
    if args.format != "text":
        columns = args.columns.split(",") if args.columns else list(COMPARISON_COLUMNS)
        try:
            written = print_paper(
                *paper.comparison_rows(table, columns), columns, args, outdir, stem
            )
        except ExperimentError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print("saved: " + ", ".join(str(f) for f in [written, *files]))
        return 0
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


def significance(args, project) -> int:
    """`--significance A B ...`: the lines of each comparison, or the paper's table of them."""
    from experiments.comparison import paper
    from experiments.comparison.significance import compare_all, report

    if not args.significance:
        raise ExperimentError("--baseline and --rope go with --significance A B ...")
    if args.rope is not None and not args.rope >= 0:
        raise ExperimentError(f"--rope {args.rope}: give a width of 0 or more, e.g. 0.01")
    if args.format == "text":
        for outcome in compare_all(args.significance, args.metric, args.baseline, args.rope):
            print(report(outcome))
        return 0
    if args.rope is not None:
        raise ExperimentError("--rope answers in the text form; leave out --format to see it")
    columns = args.columns.split(",") if args.columns else list(paper.SIGNIFICANCE_COLUMNS)
    if not args.columns and args.metric not in columns:
        columns.insert(0, args.metric)
    rows = paper.significance_rows(args.significance, columns, args.baseline)
    stem = "significance-" + "-".join(run_id[:8] for run_id in args.significance)
    outdir = Path(args.out or project.paths.reports_dir)
    print("saved: " + str(print_paper(*rows, columns, args, outdir, stem)))
    return 0


def print_paper(rows, headers, notes, columns, args, outdir: Path, stem: str) -> Path:
    """Print the paper's table in `args.format` and save it beside the others; its path."""
    from experiments.comparison.paper import render

    text = render(rows, headers, columns, args.format, notes)
    print(text, end="")
    outdir.mkdir(parents=True, exist_ok=True)
    path = outdir / f"{stem}.{'tex' if args.format == 'latex' else 'paper.md'}"
    path.write_text(text)
    return path


if __name__ == "__main__":
    from experiments.cli import exit_with

    exit_with(main)
