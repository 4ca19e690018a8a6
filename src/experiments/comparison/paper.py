"""The table a paper prints (`python -m experiments.compare ... --format markdown|latex`): each
value as mean ± std (n), the best of each column in bold, and with `--significance` a mark on
every value that differs significantly from the baseline, the tests named in a footnote.

Written here rather than through pandas' `to_latex`/`to_markdown`: those format one value a
cell, and a paper's cell is a mean, its std, its n, a bold and a mark at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from experiments.core.errors import ExperimentError

FORMATS = ("text", "markdown", "latex")
MARK = "†"  # differs from the baseline (Holm-adjusted p < ALPHA)
ALPHA = 0.05

# The columns of each kind of table unless --columns names others.
SIGNIFICANCE_COLUMNS = ("test_accuracy", "test_f1_macro", "test_ece")
COMPARISON_COLUMNS = ("val_accuracy", "test_accuracy", "train_time_s")


@dataclass
class Cell:
    mean: float
    std: float = math.nan  # nan for one value
    n: int = 1


@dataclass
class Row:
    labels: list[str]
    cells: dict[str, Cell]
    marked: set[str] = field(default_factory=set)  # the columns whose value differs


def lower_is_better(column: str) -> bool:
    from experiments.comparison.selection import LOWER_IS_BETTER

    return any(word in column for word in LOWER_IS_BETTER)


def significance_rows(
    ids: list[str], columns: list[str], baseline: str | None
) -> tuple[list[Row], list[str], list[str]]:
    """The rows of `ids` (groups or single runs, the baseline first), each column's values over
    the members, marked where the result differs from the baseline (the first of `ids` unless
    `baseline` names one) by the test `compare --significance` chooses, Holm-adjusted over the
    column's comparisons; their label headers; and the footnotes that say so."""
    from experiments import tracking
    from experiments.comparison.significance import compare_all, full_id, members

    ids = [full_id(run_id) for run_id in ids]
    baseline = full_id(baseline) if baseline else ids[0]
    ordered = [baseline, *(i for i in ids if i != baseline)]
    runs = [tracking.find_run(run_id) for run_id in ordered]
    rows = []
    for run_id, label in zip(ordered, labels_of(ordered, runs), strict=True):
        cells = {}
        for column in columns:
            try:
                values = [m.value for m in members(run_id, column)[1]]
            except ExperimentError:
                continue  # the run records no such metric: an empty cell
            cells[column] = cell_of(values)
        rows.append(Row([label, run_id[:8]], cells))
    tests, untested = {}, []  # test -> the columns it decided
    for column in columns:
        try:
            outcomes = compare_all(ordered, column, baseline)
        except ExperimentError as err:
            untested.append(f"{column}: no test ({err})")
            continue
        for row, outcome in zip(rows[1:], outcomes, strict=True):
            tests.setdefault(outcome.test or "none applied", []).append(column)
            p = outcome.p_value if math.isnan(outcome.adjusted) else outcome.adjusted
            if p < ALPHA:
                row.marked.add(column)
    holm = ", Holm-adjusted over each column's comparisons" if len(ordered) > 2 else ""
    used = "; ".join(f"{', '.join(dict.fromkeys(cols))}: {test}" for test, cols in tests.items())
    notes = [
        f"{MARK} differs from {rows[0].labels[0]} ({baseline[:8]}) at p < {ALPHA}{holm}. "
        f"Tests: {used or 'none applied'}.",
        *untested,
    ]
    return rows, ["result", "run"], notes


# Params that say where a run was recorded, not what it is.
NOT_CONFIG = ("paths.", "tracking.", "hydra.")


def labels_of(ids: list[str], runs) -> list[str]:
    """What tells the compared runs apart: the config values that differ between them
    (`optimizer.lr=0.0003`), else their names; a run not in the store by its id."""
    found = [run for run in runs if run is not None]
    keys = sorted({key for run in found for key in run.params if not key.startswith(NOT_CONFIG)})
    differing = [k for k in keys if len({run.params.get(k) for run in found}) > 1]
    return [
        run_id
        if run is None
        else ", ".join(f"{k}={run.params.get(k, '-')}" for k in differing) or run.name
        for run_id, run in zip(ids, runs, strict=True)
    ]


def cell_of(values) -> Cell:
    import numpy as np

    data = np.asarray(values, dtype=np.float64)
    std = float(data.std(ddof=1)) if len(data) > 1 else math.nan
    return Cell(float(data.mean()), std, len(data))


def comparison_rows(table, columns: list[str]) -> tuple[list[Row], list[str], list[str]]:
    """The rows of a comparison table (`tables.table_of`), labelled by the config values that
    differ between them; no marks (which need a baseline)."""
    import pandas as pd

    missing = [c for c in columns if c not in table]
    if missing:
        raise ExperimentError(f"--columns {','.join(missing)}: not a column of the table")
    from experiments import tracking

    ids = list(table["run_id"])
    labels = labels_of(ids, [tracking.find_run(run_id) for run_id in ids])
    rows = []
    for label, (_, record) in zip(labels, table.iterrows(), strict=True):
        cells = {}
        for column in columns:
            if pd.isna(record[column]):
                continue
            std = record.get(f"{column}_std", math.nan)
            cells[column] = Cell(
                float(record[column]), math.nan if pd.isna(std) else float(std), int(record["n"])
            )
        rows.append(Row([label, record["run_id"]], cells))
    notes = ["no significance marks: name the results with --significance A B ... --baseline A"]
    return rows, ["result", "run"], notes


def render(rows: list[Row], headers: list[str], columns: list[str], fmt: str, notes) -> str:
    """The table in `fmt` (markdown or latex), the best of each column in bold (the highest,
    or the lowest for losses, errors and times; every tie), the notes below it."""
    best, digits = {}, {}
    for column in columns:
        means = [r.cells[column].mean for r in rows if column in r.cells]
        if means:
            best[column] = (min if lower_is_better(column) else max)(means)
            digits[column] = decimals(column, means)
    body = [
        [
            *row.labels,
            *(
                value(row.cells[c], digits[c], row.cells[c].mean == best[c], c in row.marked, fmt)
                if c in row.cells
                else ""
                for c in columns
            ),
        ]
        for row in rows
    ]
    if fmt == "latex":
        return latex(headers + columns, len(headers), body, notes)
    line = "| " + " | ".join(headers + columns) + " |"
    rule = "| " + " | ".join(["---"] * len(headers) + ["---:"] * len(columns)) + " |"
    lines = [line, rule, *("| " + " | ".join(r) + " |" for r in body)]
    return "\n".join([*lines, "", *notes]) + "\n"


def decimals(column: str, means) -> int:
    """One column's decimals: 4 for a metric within [0, 1] (accuracy, F1, ECE), else enough
    for three significant digits of its largest value."""
    from experiments.evaluation.statistics import metric_bounds

    if metric_bounds(column)[1] <= 1.0:
        return 4
    largest = max(abs(m) for m in means)
    return 4 if largest < 1 else 2 if largest < 10 else 1


def value(cell: Cell, digits: int, bold: bool, marked: bool, fmt: str) -> str:
    mean = f"{cell.mean:.{digits}f}"
    spread = "" if math.isnan(cell.std) else f"{cell.std:.{digits}f}"
    if fmt == "latex":
        number = mean + (rf" \pm {spread}" if spread else "")
        text = f"$\\mathbf{{{number}}}$" if bold else f"${number}$"
        return text + (f" ({cell.n})" if cell.n > 1 else "") + (r"$^\dagger$" if marked else "")
    number = mean + (f" ± {spread}" if spread else "")
    text = f"**{number}**" if bold else number
    return text + (f" ({cell.n})" if cell.n > 1 else "") + (f" {MARK}" if marked else "")


def latex(headers: list[str], labels: int, body: list[list[str]], notes) -> str:
    spec = "l" * labels + "r" * (len(headers) - labels)
    lines = [
        r"\begin{tabular}{" + spec + "}",
        r"\toprule",
        " & ".join(escape(h) for h in headers) + r" \\",
        r"\midrule",
        *(" & ".join([*(escape(c) for c in row[:labels]), *row[labels:]]) + r" \\" for row in body),
        r"\bottomrule",
        r"\end{tabular}",
        *(r"\par\footnotesize " + escape(n).replace(MARK, r"$^\dagger$") for n in notes),
    ]
    return "\n".join(lines) + "\n"


LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    **{char: "\\" + char for char in "&%$#_{}"},
}


def escape(text: str) -> str:
    """`text` as LaTeX prints it literally."""
    return "".join(LATEX_SPECIAL.get(char, char) for char in text)
