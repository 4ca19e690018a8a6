"""The statistics a reviewer asks of a number: intervals that stay inside a metric's range, and
tests that fit how two results were obtained.

- `wilson_interval`: a proportion (a test accuracy on n images). The normal (Wald) interval
  leaves [0, 1] and undercovers near its ends; Wilson's does neither (Brown, Cai and DasGupta,
  2001).
- `mean_interval`: the Student-t interval of a mean over runs (seeds, folds), cut to the
  metric's range (`metric_bounds`): an accuracy's interval never goes above 1, an ECE's never
  below 0.
- `corrected_resampled_t`: two configs compared over folds or repeated splits that share their
  training data. The naive paired t-test then treats overlapping training sets as independent,
  so its variance is too small and its p-values too low; Nadeau and Bengio (2003) correct the
  variance by the ratio of test to training images.
- `mcnemar_exact` and `paired_difference_interval`: two models on the same test images.

Our own, written from the closed forms: scipy has the t and binomial distributions these use,
and Wilson's interval for one proportion (`scipy.stats.binomtest(...).proportion_ci`, which the
tests check this against), but not the corrected t-test; statsmodels, which has some of them, is
not a dependency of the project.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95

# The range of a metric, by what its name holds (the first that matches): intervals are cut to
# it. Brier's multi-class score (scikit-learn's) is a sum over classes, up to 2.
BOUNDED = (
    (("accuracy", "f1", "precision", "recall", "ece"), (0.0, 1.0)),
    (("brier",), (0.0, 2.0)),
    (
        ("loss", "nll", "time", "_s", "size", "params", "rss", "epochs", "temperature"),
        (0.0, math.inf),
    ),
)


def metric_bounds(name: str) -> tuple[float, float]:
    """The range a metric's values can take, by its name; (-inf, inf) when unknown."""
    for words, bounds in BOUNDED:
        if any(word in name for word in words):
            return bounds
    return (-math.inf, math.inf)


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson's score interval of the proportion `successes / n`; (nan, nan) for n = 0."""
    if n <= 0:
        return (math.nan, math.nan)
    from scipy import stats

    z = float(stats.norm.ppf(0.5 + confidence / 2))
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass
class MeanInterval:
    mean: float
    std: float  # the sample's (n - 1)
    low: float
    high: float


def mean_interval(values, name: str = "", confidence: float = CONFIDENCE) -> MeanInterval:
    """The mean of `values`, their std (n - 1) and the Student-t interval of the mean, cut to
    the range of the metric `name` (`metric_bounds`). One value has no std and no interval."""
    from scipy import stats

    data = np.asarray(values, dtype=np.float64)
    n = len(data)
    mean = float(data.mean())
    if n < 2:
        return MeanInterval(mean, math.nan, math.nan, math.nan)
    std = float(data.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * std / math.sqrt(n))
    low, high = metric_bounds(name)
    return MeanInterval(mean, std, max(low, mean - half), min(high, mean + half))


@dataclass
class TestResult:
    name: str  # the test, as a line names it
    statistic: float
    p_value: float
    why: str = ""  # why this test, for the line that reports it


def corrected_resampled_t(differences, test_share: float) -> TestResult:
    """Nadeau and Bengio's corrected resampled t-test of paired `differences` (one per fold or
    repeated split) whose training sets overlap: the variance of the mean difference is
    (1/k + n_test/n_train) s^2 rather than s^2/k, with k - 1 degrees of freedom.

    `test_share` is n_test/n_train of one resample: 1/(K - 1) for K-fold cross-validation.
    """
    from scipy import stats

    d = np.asarray(differences, dtype=np.float64)
    k = len(d)
    if k < 2:
        raise ValueError("the corrected t-test needs two or more paired differences")
    variance = float(d.var(ddof=1))
    if variance == 0.0:
        t = 0.0 if d.mean() == 0 else math.copysign(math.inf, d.mean())
        return TestResult("corrected resampled t-test (Nadeau-Bengio)", t, 1.0 if t == 0 else 0.0)
    t = float(d.mean() / math.sqrt((1 / k + test_share) * variance))
    p = float(2 * stats.t.sf(abs(t), k - 1))
    return TestResult("corrected resampled t-test (Nadeau-Bengio)", t, p)


def mcnemar_exact(only_first_right: int, only_second_right: int) -> float:
    """McNemar's exact test: a two-sided binomial test of the discordant images (those one model
    gets right and the other wrong); the images both get right or wrong say nothing."""
    from scipy import stats

    discordant = only_first_right + only_second_right
    return float(stats.binomtest(only_first_right, discordant, 0.5).pvalue) if discordant else 1.0


def paired_difference_interval(
    only_first_right: int, only_second_right: int, n: int, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """The interval of the accuracy difference of two models on the same n images (Wald's, for
    paired proportions), cut to [-1, 1]."""
    from scipy import stats

    z = float(stats.norm.ppf(0.5 + confidence / 2))
    difference = (only_first_right - only_second_right) / n
    discordant = (only_first_right + only_second_right) / n
    half = z * math.sqrt(max(discordant - difference**2, 0.0) / n)
    return (max(-1.0, difference - half), min(1.0, difference + half))


def two_proportions(successes_a: int, n_a: int, successes_b: int, n_b: int) -> float:
    """Fisher's exact test of two proportions from independent samples (two runs' accuracies on
    different test images): the two-sided p-value."""
    from scipy import stats

    table = [[successes_a, n_a - successes_a], [successes_b, n_b - successes_b]]
    return float(stats.fisher_exact(table).pvalue)


def bootstrap_interval(
    statistic, n: int, resamples: int = 1000, seed: int = 0, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """The percentile bootstrap interval of a statistic over n images resampled with
    replacement `resamples` times (seeded: the same data give the same interval).

    `statistic(weights)` takes a (resamples, n) matrix of how often each image was drawn in
    each resample and returns one value per resample: a statistic that is a weighted sum over
    images (a mean, a Brier score, an ECE's per-bin gaps) then costs one matrix product, not
    a thousand calls. Resamples go in chunks of 100, so memory stays at 100 x n counts.
    """
    rng = np.random.default_rng(seed)
    values = []
    for start in range(0, resamples, 100):
        size = min(100, resamples - start)
        drawn = rng.integers(0, n, (size, n))
        weights = np.zeros((size, n), dtype=np.float64)
        np.add.at(weights, (np.repeat(np.arange(size), n), drawn.ravel()), 1.0)
        values.append(np.asarray(statistic(weights), dtype=np.float64))
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(np.concatenate(values), [tail, 100 - tail])
    return (float(low), float(high))
