"""Every statistic against an independent computation: scipy where it has one, else the closed
form written out here."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from experiments.evaluation import statistics


@pytest.mark.parametrize(("k", "n"), [(427, 456), (0, 20), (20, 20), (3, 7), (500, 1000)])
def test_wilson_interval_is_scipys(k, n):
    expected = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = statistics.wilson_interval(k, n)
    assert low == pytest.approx(expected.low, abs=1e-12)
    assert high == pytest.approx(expected.high, abs=1e-12)
    assert 0.0 <= low <= k / n <= high <= 1.0


def test_the_issues_test_accuracy_interval():
    """0.9364 on 456 images: Wilson's 95% interval is [0.910, 0.955]."""
    low, high = statistics.wilson_interval(427, 456)
    assert (round(low, 3), round(high, 3)) == (0.910, 0.955)


def test_a_mean_interval_stays_inside_the_metrics_range():
    accuracies = [0.99, 1.0, 1.0, 0.97]
    interval = statistics.mean_interval(accuracies, "test_accuracy")
    data = np.array(accuracies)
    half = stats.t.ppf(0.975, 3) * data.std(ddof=1) / math.sqrt(4)
    assert interval.mean == pytest.approx(data.mean())
    assert interval.low == pytest.approx(data.mean() - half)
    assert data.mean() + half > 1.0 and interval.high == 1.0  # cut to the accuracy's range
    eces = [0.001, 0.03, 0.002]
    assert statistics.mean_interval(eces, "test_ece").low == 0.0
    assert statistics.mean_interval([-1.0, 3.0], "margin").low < -1.0  # no known range
    assert math.isnan(statistics.mean_interval([0.5], "test_accuracy").low)


def test_metric_bounds_by_name():
    assert statistics.metric_bounds("best_val_accuracy_mean") == (0.0, 1.0)
    assert statistics.metric_bounds("test_brier") == (0.0, 2.0)
    assert statistics.metric_bounds("test_loss") == (0.0, math.inf)
    assert statistics.metric_bounds("test_ece_bins") == (0.0, math.inf)  # a count (15), not an ECE
    assert statistics.metric_bounds("something") == (-math.inf, math.inf)


def test_corrected_resampled_t_against_its_closed_form():
    """Nadeau and Bengio (2003): t = mean(d) / sqrt((1/k + n2/n1) s^2), k - 1 degrees of
    freedom; for 5 folds n2/n1 = 1/4. Its p-value is larger than the naive paired test's."""
    d = np.array([0.012, -0.004, 0.020, 0.008, 0.015])
    k, share = len(d), 1 / 4
    t = d.mean() / math.sqrt((1 / k + share) * d.var(ddof=1))
    p = 2 * (1 - stats.t.cdf(abs(t), k - 1))
    result = statistics.corrected_resampled_t(d, share)
    assert result.statistic == pytest.approx(t)
    assert result.p_value == pytest.approx(p)
    naive = stats.ttest_1samp(d, 0.0)
    assert result.p_value > naive.pvalue
    with pytest.raises(ValueError):
        statistics.corrected_resampled_t([0.1], share)


def test_mcnemar_exact_and_the_paired_interval():
    b, c, n = 14, 5, 456
    assert statistics.mcnemar_exact(b, c) == pytest.approx(stats.binomtest(b, b + c).pvalue)
    assert statistics.mcnemar_exact(0, 0) == 1.0
    low, high = statistics.paired_difference_interval(b, c, n)
    d = (b - c) / n
    half = stats.norm.ppf(0.975) * math.sqrt(((b + c) / n - d * d) / n)
    assert (low, high) == pytest.approx((d - half, d + half))


def test_two_independent_proportions_is_fishers_exact_test():
    expected = stats.fisher_exact([[427, 29], [410, 46]]).pvalue
    assert statistics.two_proportions(427, 456, 410, 456) == pytest.approx(expected)


def test_the_bootstrap_interval_is_a_percentile_bootstraps():
    """A mean's percentile interval, against scipy's bootstrap (its own resamples: close, not
    equal); the same seed gives the same interval."""
    rng = np.random.default_rng(1)
    x = rng.normal(0.8, 0.2, 300)
    ours = statistics.bootstrap_interval(lambda w: w @ x / len(x), len(x), resamples=4000)
    theirs = stats.bootstrap((x,), np.mean, n_resamples=4000, method="percentile", rng=2)
    assert ours == pytest.approx(
        (theirs.confidence_interval.low, theirs.confidence_interval.high), abs=0.005
    )
    assert statistics.bootstrap_interval(lambda w: w @ x / len(x), len(x)) == (
        statistics.bootstrap_interval(lambda w: w @ x / len(x), len(x))
    )


def test_mcnemar_is_statsmodels():
    from statsmodels.stats.contingency_tables import mcnemar

    for b, c in ((14, 5), (3, 0), (40, 38), (1, 9)):
        expected = mcnemar([[100, b], [c, 100]], exact=True).pvalue
        assert statistics.mcnemar_exact(b, c) == pytest.approx(expected)


def test_paired_accuracy_counts_the_discordant_images():
    right = np.array([1, 1, 0, 0, 1, 1], dtype=bool)
    other = np.array([1, 0, 1, 0, 0, 1], dtype=bool)
    paired = statistics.paired_accuracy(right, other)
    assert (paired.only_this_right, paired.only_other_right) == (2, 1)
    assert paired.difference == pytest.approx(4 / 6 - 3 / 6)
    assert paired.p_value == pytest.approx(stats.binomtest(2, 3).pvalue)
    with pytest.raises(ValueError):
        statistics.paired_accuracy(right, other[:3])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_holm_is_statsmodels(seed):
    from statsmodels.stats.multitest import multipletests

    p = np.random.default_rng(seed).uniform(0, 0.2, 7)
    p[3] = p[5]  # a tie
    assert statistics.holm(p) == pytest.approx(multipletests(p, method="holm")[1].tolist())
    assert statistics.holm([0.03]) == [0.03]


@pytest.mark.parametrize("rope", [0.0, 0.01, 0.05])
def test_the_bayesian_correlated_t_test_is_baycomps(rope):
    """baycomp's CorrelatedTTest over one run of k-fold cross-validation corrects the variance
    by 1/(k - 1): n_test/n_train of a fold. Its x and y are the other way round (y - x)."""
    import baycomp

    x = np.array([0.80, 0.82, 0.79, 0.85, 0.81, 0.83])
    y = np.array([0.78, 0.80, 0.80, 0.81, 0.80, 0.79])
    ours = statistics.bayesian_correlated_t(x - y, 1 / (len(x) - 1), rope)
    if rope:
        left, within, right = baycomp.two_on_single(x, y, rope=rope)
        assert (ours.first_better, ours.equivalent, ours.second_better) == pytest.approx(
            (left, within, right)
        )
    else:
        left, right = baycomp.two_on_single(x, y)
        assert (ours.first_better, ours.second_better) == pytest.approx((left, right))
    assert ours.first_better + ours.equivalent + ours.second_better == pytest.approx(1.0)
    same = statistics.bayesian_correlated_t([0.01, 0.01, 0.01], 0.0, 0.02)
    assert (same.first_better, same.equivalent, same.second_better) == (0.0, 1.0, 0.0)


def loop_bootstrap(d, resamples, rng):
    """The two-level paired bootstrap written the plain way: draw members, then images."""
    k, n = d.shape
    values = []
    for _ in range(resamples):
        rows = d[rng.integers(0, k, k)]
        values.append(rows[:, rng.integers(0, n, n)].mean())
    return np.percentile(values, [2.5, 97.5])


def test_the_paired_bootstrap_resamples_members_and_images():
    """Against the plain loop (its own draws: close, not equal); with one member it is the
    bootstrap of paired accuracies, whose interval the closed-form paired (Wald) one nears; the
    members' spread widens it, and its p-value is near the paired Wald test's."""
    rng = np.random.default_rng(3)
    base = rng.random(400)
    right_a = np.stack([base < p for p in (0.82, 0.85, 0.80)])
    right_b = np.stack([rng.random(400) < p for p in (0.78, 0.74, 0.79)])
    d = right_a.astype(float) - right_b
    ours = statistics.paired_bootstrap(d, resamples=3000)
    assert ours.difference == pytest.approx(d.mean())
    assert ours.ci95 == pytest.approx(tuple(loop_bootstrap(d, 3000, rng)), abs=0.008)
    one = statistics.paired_bootstrap(d[:1], resamples=4000)
    b, c = int((right_a[0] & ~right_b[0]).sum()), int((~right_a[0] & right_b[0]).sum())
    assert one.ci95 == pytest.approx(statistics.paired_difference_interval(b, c, 400), abs=0.006)
    difference = (b - c) / 400
    z = difference / math.sqrt(((b + c) / 400 - difference**2) / 400)
    assert one.p_value == pytest.approx(2 * stats.norm.sf(abs(z)), abs=0.04)  # Wald's test
    images_only = statistics.paired_bootstrap(np.repeat(d.mean(0, keepdims=True), 3, 0))
    assert ours.ci95[1] - ours.ci95[0] > images_only.ci95[1] - images_only.ci95[0]
    assert statistics.paired_bootstrap(np.zeros((3, 50))).p_value == 1.0
