"""Whether results differ in a metric, by a test that fits how they were obtained, named with
the reason it applies (`python -m experiments.compare --significance A B [C ...]`).

- Two single runs on the same test images (the same digest in their per-image predictions):
  McNemar's exact test and a paired interval of the accuracy difference, read from the stored
  predictions without evaluating anything again.
- Two groups whose members pair up, run for run, on the same data (the same fold and seed, and
  the same digests of their train, val and test splits):
  - over folds (`task.folds`), whose training sets overlap: the corrected resampled t-test of
    Nadeau and Bengio, never the naive paired t-test, whose p-values are then too low;
  - over seeds on one fixed split (`trainer.repeats`): the paired t-test over seeds, which covers
    the seeds' noise only, and for test accuracy a paired bootstrap over the seeds and the test
    images from the members' stored predictions, which covers both; its p-value is the one the
    comparison reports;
  - with `rope`, the Bayesian correlated t-test as well: P(first better), P(equivalent),
    P(second better).
- Anything else (other seeds or folds, other data: a `task.split_seed`, a `task.path`, other test
  images): never paired. Welch's t-test for groups, a test of two independent proportions for
  single runs, with a line that says why.

More than two results: each against a baseline, or every pair, with Holm-adjusted p-values.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

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


@dataclass
class Outcome:
    """One comparison of two results: the line that reports it and the p-value it rests on."""

    first: str
    second: str
    metric: str
    line: str
    test: str = ""  # the test whose p-value this is; "" when none applied
    p_value: float = math.nan
    adjusted: float = math.nan  # Holm's, when it is one of several comparisons
    notes: list[str] = field(default_factory=list)  # what follows the line (other tests)


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


def significance(first: str, second: str, metric: str, rope: float | None = None) -> Outcome:
    """Whether `first` and `second` (groups, or single runs) differ in `metric`: the test used,
    why, and its p-value."""
    group_a, a = members(first, metric)
    group_b, b = members(second, metric)
    if not group_a and not group_b:
        return single_runs(first, second, metric, rope)
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
        name, p, text = welch(a, b)
        notes = [] if rope is None else ["no Bayesian test: --rope needs members that pair up"]
        line += text + f" (not paired: {why})"
        return Outcome(first, second, metric, line, name, p, notes)
    pairs = sorted({m.key for m in a})
    first_by, second_by = {m.key: m for m in a}, {m.key: m for m in b}
    d = [first_by[k].value - second_by[k].value for k in pairs]
    if all(x == 0 for x in d):
        text = f"the two groups are equal on each of their {len(d)} members; no test"
        return Outcome(first, second, metric, line + text, "equal members", 1.0)
    folds = {fold for fold, _ in pairs} - {"None"}
    share = 0.0
    if folds:
        from experiments.evaluation.statistics import corrected_resampled_t

        share = float(np.mean([first_by[k].n_val / first_by[k].n_train for k in pairs]))
        result = corrected_resampled_t(d, share)
        outcome = Outcome(first, second, metric, line, result.name, result.p_value)
        outcome.line += (
            f"{result.name} over {len(folds)} folds x {len(pairs) // len(folds)} seed(s), "
            f"n_val/n_train = {share:.3f}: t = {result.statistic:.3f}, p = {result.p_value:.4g} "
            f"(paired on the same data; folds share their training images, so the naive paired "
            f"t-test would understate the variance)"
        )
    else:
        from scipy import stats

        test = stats.ttest_rel(
            [first_by[k].value for k in pairs], [second_by[k].value for k in pairs]
        )
        seeds = ", ".join(str(seed) for _, seed in pairs)
        outcome = Outcome(first, second, metric, line, "paired t-test", float(test.pvalue))
        outcome.line += (
            f"paired t-test over seeds {seeds}: t = {test.statistic:.3f}, p = {test.pvalue:.4g} "
            f"(paired on the same data; it covers the seeds' noise, not the test sample's, "
            f"which every member shares)"
        )
        if metric == "test_accuracy":
            bootstrap_over_images(outcome, [(first_by[k], second_by[k]) for k in pairs])
    if rope is not None:
        from experiments.evaluation.statistics import bayesian_correlated_t

        posterior = bayesian_correlated_t(d, share, rope)
        outcome.notes.append(
            f"Bayesian correlated t-test (rope ±{rope:g}, "
            + (f"n_val/n_train = {share:.3f}" if folds else "over seeds: no fold correction")
            + "): "
            f"P({first[:8]} better) = {posterior.first_better:.3f}, P(equivalent) = "
            f"{posterior.equivalent:.3f}, P({second[:8]} better) = {posterior.second_better:.3f}"
        )
    return outcome


def bootstrap_over_images(outcome: Outcome, pairs: list[tuple[Member, Member]]) -> None:
    """Add the paired bootstrap over seeds and test images to `outcome`, and rest its p-value
    on it, when every member stored its test predictions; a note saying why not otherwise."""
    from experiments import tracking
    from experiments.evaluation.statistics import paired_bootstrap

    rows = []
    for first, second in pairs:
        try:
            a, b = tracking.predictions(first.run_id), tracking.predictions(second.run_id)
        except ExperimentError:
            outcome.notes.append(
                "no bootstrap over test images: not every member keeps its per-image "
                "predictions (evaluation/predictions_test.csv)"
            )
            return
        if a.digest != b.digest or len(a.labels) != len(b.labels):
            outcome.notes.append(
                f"no bootstrap over test images: the stored predictions of {first.run_id[:8]} "
                f"and {second.run_id[:8]} are not of the same images"
            )
            return
        rows.append(a.correct.astype(float) - b.correct.astype(float))
    result = paired_bootstrap(np.stack(rows))
    low, high = result.ci95
    outcome.test, outcome.p_value = "paired bootstrap over seeds and test images", result.p_value
    outcome.notes.append(
        f"paired bootstrap over the {len(rows)} seeds and {rows[0].size} test images: 95% CI "
        f"{low:+.4f} to {high:+.4f}, p = {result.p_value:.4g} (covers both; the p-value "
        f"this comparison rests on)"
    )


def full_id(run_id: str) -> str:
    """The whole id of a run given by its id or its start (the 8 characters tables show)."""
    import re

    from experiments import tracking

    if re.fullmatch(r"[0-9a-f]{32}", run_id):  # whole already (one not stored: `members` says)
        return run_id
    run = tracking.find_run(run_id)
    if run is None:
        raise ExperimentError(f"--significance {run_id}: no such run in this store")
    return run.run_id


def compare_all(
    ids: list[str], metric: str, baseline: str | None = None, rope: float | None = None
) -> list[Outcome]:
    """Each result against `baseline` (one of `ids`), or every pair when there is none; with
    more than one comparison, each p-value is also given Holm-adjusted over all of them."""
    from experiments.evaluation.statistics import holm

    ids = [full_id(run_id) for run_id in ids]
    baseline = full_id(baseline) if baseline else None
    if len(set(ids)) != len(ids) or len(ids) < 2:
        raise ExperimentError("--significance takes two or more different runs or groups")
    if baseline is not None and baseline not in ids:
        ids = [baseline, *ids]
    pairs = (
        [(baseline, other) for other in ids if other != baseline]
        if baseline
        else list(itertools.combinations(ids, 2))
    )
    outcomes = [significance(a, b, metric, rope) for a, b in pairs]
    tested = [o for o in outcomes if not math.isnan(o.p_value)]
    if len(tested) > 1:
        for outcome, adjusted in zip(tested, holm([o.p_value for o in tested]), strict=True):
            outcome.notes.append(f"Holm-adjusted p = {adjusted:.4g} over {len(tested)} comparisons")
            outcome.adjusted = adjusted
    return outcomes


def report(outcome: Outcome) -> str:
    """The outcome as `compare` prints it: its line, then its notes, one a line."""
    return "\n".join([outcome.line, *(f"  {note}" for note in outcome.notes)])


def described(run_id: str, found: list[Member]) -> str:
    data = np.array([m.value for m in found])
    return f"{run_id[:8]} {data.mean():.4f} ± {data.std(ddof=1):.4f} ({len(data)})"


def welch(a: list[Member], b: list[Member]) -> tuple[str, float, str]:
    from scipy import stats

    test = stats.ttest_ind([m.value for m in a], [m.value for m in b], equal_var=False)
    text = f"Welch's t-test: t = {test.statistic:.3f}, p = {test.pvalue:.4g}"
    return "Welch's t-test", float(test.pvalue), text


def single_runs(first: str, second: str, metric: str, rope: float | None = None) -> Outcome:
    """Two single runs: McNemar's exact test on the same test images, from their stored
    per-image predictions; on other images, a test of two independent proportions."""
    if metric != "test_accuracy":
        raise ExperimentError(
            f"--significance {first} {second}: single runs give one {metric} each, which no "
            f"test can compare; compare test_accuracy (from their per-image predictions), or "
            f"groups (trainer.repeats=N)"
        )
    from experiments import tracking
    from experiments.evaluation.statistics import paired_accuracy, two_proportions

    a, b = tracking.predictions(first, "test"), tracking.predictions(second, "test")
    right_a, right_b = a.correct, b.correct
    accuracy_a, accuracy_b = right_a.mean(), right_b.mean()
    line = (
        f"test_accuracy: {first[:8]} {accuracy_a:.4f} ({len(right_a)}) vs {second[:8]} "
        f"{accuracy_b:.4f} ({len(right_b)}); difference {accuracy_a - accuracy_b:+.4f}; "
    )
    notes = [] if rope is None else ["no Bayesian test: --rope needs two paired groups"]
    if a.digest != b.digest:
        p = two_proportions(int(right_a.sum()), len(right_a), int(right_b.sum()), len(right_b))
        line += (
            f"two independent proportions (Fisher's exact test): p = {p:.4g} (not paired: their "
            f"test images differ, digest {a.digest} against {b.digest})"
        )
        return Outcome(first, second, metric, line, "Fisher's exact test", p, notes)
    paired = paired_accuracy(right_a, right_b)
    low, high = paired.ci95
    line += (
        f"95% CI {low:+.4f} to {high:+.4f}; McNemar's exact test on the same {len(right_a)} test "
        f"images ({paired.only_this_right} right only by the first, {paired.only_other_right} "
        f"only by the second): p = {paired.p_value:.4g}"
    )
    return Outcome(first, second, metric, line, "McNemar's exact test", paired.p_value, notes)
