"""Whether two results differ in a metric, by a test that fits how they were obtained, named with
the reason it applies (`python -m experiments.compare --significance A B`).

- Two single runs on the same test images (the same digest in their per-image predictions):
  McNemar's exact test and a paired interval of the accuracy difference, read from the stored
  predictions without evaluating anything again.
- Two groups whose members pair up, run for run, on the same data (the same fold and seed, and
  the same digests of their train, val and test splits):
  - over folds (`task.folds`), whose training sets overlap: the corrected resampled t-test of
    Nadeau and Bengio, never the naive paired t-test, whose p-values are then too low;
  - over seeds on one fixed split (`trainer.repeats`): the paired t-test over seeds. It covers
    the seeds' noise only, not the test sample's, which every member shares.
- Anything else (other seeds or folds, other data: a `task.split_seed`, a `task.path`, other test
  images): never paired. Welch's t-test for groups, a test of two independent proportions for
  single runs, with a line that says why.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from experiments.core.errors import ExperimentError
from experiments.tracking import tags as T


@dataclass
class Member:
    """One run of a compared result: its value, what pairs it, and its data's digests."""

    run_id: str
    value: float
    key: tuple  # (fold, seed)
    digests: dict[str, str]  # split -> digest of the split's files and labels
    n_train: float
    n_val: float


def members(run_id: str, metric: str) -> tuple[bool, list[Member]]:
    """(whether `run_id` is a group, its FINISHED members holding `metric`): a group's children,
    or the run itself."""
    from experiments import tracking

    run = tracking.find_run(run_id)
    if run is None:
        raise ExperimentError(f"--significance {run_id}: no such run in this store")
    group = run.tags.get(T.GROUP) == "true"
    rows = (
        tracking.run_rows(
            f"tags.{T.PARENT_RUN} = '{run.run_id}' and attributes.status = 'FINISHED'"
        )
        if group
        else [run]
    )
    found = [
        Member(
            r.run_id,
            r.metrics[metric],
            (r.params.get("task.fold", "None"), int(r.params.get("trainer.seed", 0))),
            tracking.registry.dataset_digests(r.run_id),
            r.metrics.get("n_train", float("nan")),
            r.metrics.get("n_val", float("nan")),
        )
        for r in rows
        if metric in r.metrics
    ]
    if group and len(found) < 2:
        raise ExperimentError(f"--significance {run_id}: fewer than 2 members with {metric}")
    if not found:
        raise ExperimentError(f"--significance {run_id}: the run records no {metric}")
    return group, found


def unpaired_reason(a: list[Member], b: list[Member]) -> str:
    """Why two groups' members do not pair up run for run; "" when they do."""
    first, second = {m.key: m for m in a}, {m.key: m for m in b}
    if sorted(first) != sorted(second):
        return "their members' seeds or folds differ"
    for key, member in sorted(first.items()):
        other = second[key]
        for split in ("test", "val", "train"):
            if member.digests.get(split) != other.digests.get(split):
                fold, seed = key
                where = f"seed {seed}" + ("" if fold == "None" else f", fold {fold}")
                return (
                    f"their {split} data differ ({where}: digest {member.digests.get(split)} "
                    f"against {other.digests.get(split)}; another task.split_seed, task.path or "
                    f"image set)"
                )
    return ""


def significance(first: str, second: str, metric: str) -> str:
    """The line that says whether `first` and `second` (groups, or single runs) differ in
    `metric`, the test used and why."""
    group_a, a = members(first, metric)
    group_b, b = members(second, metric)
    if not group_a and not group_b:
        return single_runs(first, second, metric)
    if group_a != group_b:
        raise ExperimentError(
            f"--significance {first} {second}: one is a group and the other a single run; "
            f"compare two groups (trainer.repeats, task.folds) or two single runs"
        )
    line = f"{metric}: {described(first, a)} vs {described(second, b)}; "
    difference = np.mean([m.value for m in a]) - np.mean([m.value for m in b])
    line += f"difference {difference:+.4f}; "
    why = unpaired_reason(a, b)
    if why:
        return line + welch(a, b) + f" (not paired: {why})"
    pairs = sorted({m.key for m in a})
    first_by, second_by = {m.key: m for m in a}, {m.key: m for m in b}
    d = [first_by[k].value - second_by[k].value for k in pairs]
    if all(x == 0 for x in d):
        return line + f"the two groups are equal on each of their {len(d)} members; no test"
    folds = {fold for fold, _ in pairs} - {"None"}
    if folds:
        from experiments.evaluation.statistics import corrected_resampled_t

        share = float(np.mean([first_by[k].n_val / first_by[k].n_train for k in pairs]))
        result = corrected_resampled_t(d, share)
        return line + (
            f"{result.name} over {len(folds)} folds x {len(pairs) // len(folds)} seed(s), "
            f"n_val/n_train = {share:.3f}: t = {result.statistic:.3f}, p = {result.p_value:.4g} "
            f"(paired on the same data; folds share their training images, so the naive paired "
            f"t-test would understate the variance)"
        )
    from scipy import stats

    test = stats.ttest_rel([first_by[k].value for k in pairs], [second_by[k].value for k in pairs])
    seeds = ", ".join(str(seed) for _, seed in pairs)
    return line + (
        f"paired t-test over seeds {seeds}: t = {test.statistic:.3f}, p = {test.pvalue:.4g} "
        f"(paired on the same data; it covers the seeds' noise, not the test sample's, which "
        f"every member shares)"
    )


def described(run_id: str, found: list[Member]) -> str:
    data = np.array([m.value for m in found])
    return f"{run_id[:8]} {data.mean():.4f} ± {data.std(ddof=1):.4f} ({len(data)})"


def welch(a: list[Member], b: list[Member]) -> str:
    from scipy import stats

    test = stats.ttest_ind([m.value for m in a], [m.value for m in b], equal_var=False)
    return f"Welch's t-test: t = {test.statistic:.3f}, p = {test.pvalue:.4g}"


def single_runs(first: str, second: str, metric: str) -> str:
    """Two single runs: McNemar's exact test on the same test images, from their stored
    per-image predictions; on other images, a test of two independent proportions."""
    if metric != "test_accuracy":
        raise ExperimentError(
            f"--significance {first} {second}: single runs give one {metric} each, which no "
            f"test can compare; compare test_accuracy (from their per-image predictions), or "
            f"groups (trainer.repeats=N)"
        )
    from experiments import tracking
    from experiments.evaluation.statistics import (
        mcnemar_exact,
        paired_difference_interval,
        two_proportions,
    )

    a, b = tracking.predictions(first, "test"), tracking.predictions(second, "test")
    right_a, right_b = a.correct, b.correct
    accuracy_a, accuracy_b = right_a.mean(), right_b.mean()
    line = (
        f"test_accuracy: {first[:8]} {accuracy_a:.4f} ({len(right_a)}) vs {second[:8]} "
        f"{accuracy_b:.4f} ({len(right_b)}); difference {accuracy_a - accuracy_b:+.4f}; "
    )
    if a.digest != b.digest:
        p = two_proportions(int(right_a.sum()), len(right_a), int(right_b.sum()), len(right_b))
        return line + (
            f"two independent proportions (Fisher's exact test): p = {p:.4g} (not paired: their "
            f"test images differ, digest {a.digest} against {b.digest})"
        )
    only_a = int((right_a & ~right_b).sum())
    only_b = int((~right_a & right_b).sum())
    low, high = paired_difference_interval(only_a, only_b, len(right_a))
    return line + (
        f"95% CI {low:+.4f} to {high:+.4f}; McNemar's exact test on the same {len(right_a)} test "
        f"images ({only_a} right only by the first, {only_b} only by the second): "
        f"p = {mcnemar_exact(only_a, only_b):.4g}"
    )
