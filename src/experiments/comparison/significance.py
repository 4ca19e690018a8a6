"""Whether two groups of runs (trainer.repeats, task.folds) differ in a metric."""

from __future__ import annotations

from experiments.core.errors import ExperimentError
from experiments.tracking import tags as T


def group_members(parent_id: str, metric: str) -> dict[tuple, float]:
    """`metric` of each FINISHED member of the group run `parent_id`, by (fold, seed)."""
    from experiments import tracking

    parent = tracking.find_run(parent_id)
    if parent is None or parent.tags.get(T.GROUP) != "true":
        raise ExperimentError(
            f"--significance {parent_id}: not a group's parent run (a run of trainer.repeats=N, "
            f"tagged group=true); give the run id of one"
        )
    rows = tracking.run_rows(
        f"tags.{T.PARENT_RUN} = '{parent_id}' and attributes.status = 'FINISHED'"
    )
    values = {
        (r.params.get("task.fold", "None"), int(r.params["trainer.seed"])): r.metrics[metric]
        for r in rows
        if metric in r.metrics
    }
    if len(values) < 2:
        raise ExperimentError(f"--significance {parent_id}: fewer than 2 members with {metric}")
    return values


def significance(first: str, second: str, metric: str) -> str:
    """Whether two groups differ in `metric`: a paired t-test when both ran the same seeds
    (each seed's runs share their initialisation and data order), else Welch's t-test."""
    import numpy as np
    from scipy import stats

    a, b = group_members(first, metric), group_members(second, metric)
    if sorted(a) == sorted(b) and all(a[k] == b[k] for k in a):
        return f"{metric}: the two groups are equal on each of their {len(a)} members; no test"
    if sorted(a) == sorted(b):
        pairs = sorted(a)
        test = stats.ttest_rel([a[k] for k in pairs], [b[k] for k in pairs])
        folds = {fold for fold, _ in pairs} - {"None"}
        seeds = sorted({seed for _, seed in pairs})
        kind = f"paired t-test over seeds {', '.join(map(str, seeds))}" + (
            f" and {len(folds)} folds" if folds else ""
        )
    else:
        test = stats.ttest_ind(list(a.values()), list(b.values()), equal_var=False)
        kind = "Welch's t-test (the members' seeds or folds differ)"
    parts = []
    for name, values in ((first[:8], a), (second[:8], b)):
        data = np.array(list(values.values()))
        parts.append(f"{name} {data.mean():.4f} ± {data.std(ddof=1):.4f} ({len(data)})")
    difference = np.mean(list(a.values())) - np.mean(list(b.values()))
    return (
        f"{metric}: {parts[0]} vs {parts[1]}; difference {difference:+.4f}; {kind}: "
        f"t = {test.statistic:.3f}, p = {test.pvalue:.4g}"
    )
