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
- `mcnemar_exact` and `paired_difference_interval` (`paired_accuracy`): two models on the same
  test images.
- `bayesian_correlated_t`: the same paired differences as the corrected t-test, read as a
  posterior: how likely one config is better, or both practically equivalent within a rope
  (Corani and Benavoli, 2015; Benavoli et al., 2017).
- `paired_bootstrap`: two groups on the same seeds and test images, resampling both the seeds
  and the images, so that both kinds of noise count.
- `holm`: p-values of several comparisons adjusted for their number (Holm, 1979).

Our own, written from the closed forms: scipy has the t and binomial distributions these use,
and Wilson's interval for one proportion (`scipy.stats.binomtest(...).proportion_ci`), but not
the corrected t-tests, the hierarchical bootstrap or Holm's step-down. statsmodels (Holm,
McNemar) and baycomp (the Bayesian correlated t-test) have some of them, at the price of a
dependency each for a few lines; the tests check ours against them (both in the dev extra).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95

# The range of a metric, by what its name holds (the first that matches): intervals are cut to
# it. Brier's multi-class score (scikit-learn's) is a sum over classes, up to 2.
BOUNDED = (
    (("bins",), (0.0, math.inf)),  # test_ece_bins is a count, not an ECE
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


@dataclass
class PairedAccuracy:
    """Two models' accuracies on the same images, and the test of their difference."""

    accuracy: float
    other_accuracy: float
    only_this_right: int
    only_other_right: int
    p_value: float  # McNemar's exact test
    ci95: tuple[float, float]  # of the accuracy difference

    @property
    def difference(self) -> float:
        return self.accuracy - self.other_accuracy


def paired_accuracy(right, other_right) -> PairedAccuracy:
    """Whether two models, right or wrong on each of the same images (boolean arrays in the same
    order), differ in accuracy: McNemar's exact test looks only at the images where they
    disagree on being right; the shared ones say nothing about the difference."""
    right, other_right = np.asarray(right, dtype=bool), np.asarray(other_right, dtype=bool)
    if right.shape != other_right.shape:
        raise ValueError("the two models were not scored on the same images")
    b, c, n = int((right & ~other_right).sum()), int((~right & other_right).sum()), len(right)
    return PairedAccuracy(
        accuracy=float(right.mean()),
        other_accuracy=float(other_right.mean()),
        only_this_right=b,
        only_other_right=c,
        p_value=mcnemar_exact(b, c),
        ci95=paired_difference_interval(b, c, n),
    )


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
    return percentiles(bootstrap_values(statistic, n, resamples, seed), confidence)


def bootstrap_values(statistic, n: int, resamples: int = 1000, seed: int = 0):
    """The statistic's value on each of `resamples` resamples of n items (`bootstrap_interval`
    says what `statistic` takes)."""
    rng = np.random.default_rng(seed)
    values = []
    for start in range(0, resamples, 100):
        size = min(100, resamples - start)
        values.append(np.asarray(statistic(resample_counts(rng, size, n)), dtype=np.float64))
    return np.concatenate(values)


def resample_counts(rng, size: int, n: int):
    """A (size, n) matrix: how often each of n items was drawn in each of `size` resamples of n
    draws with replacement."""
    drawn = rng.integers(0, n, (size, n))
    counts = np.zeros((size, n), dtype=np.float64)
    np.add.at(counts, (np.repeat(np.arange(size), n), drawn.ravel()), 1.0)
    return counts


def percentiles(values, confidence: float = CONFIDENCE) -> tuple[float, float]:
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return (float(low), float(high))


@dataclass
class Bootstrap:
    difference: float  # the observed mean difference
    ci95: tuple[float, float]
    p_value: float  # two-sided: twice the smaller share of resamples on either side of 0


def paired_bootstrap(differences, resamples: int = 2000, seed: int = 0) -> Bootstrap:
    """A two-level paired bootstrap of two groups scored on the same test images.

    `differences` is a (members, images) matrix: for each pair of members (the same seed, or
    fold) and each test image, the first member's score minus the second's (for accuracy, 1, 0
    or -1). Each resample draws the member pairs and, independently, the images with
    replacement, so the interval of the mean difference covers the seeds' noise and the test
    sample's. (Resampling only the members leaves out the images'; only the images, the
    seeds'.) The p-value is the percentile bootstrap's: where 0 falls among the resamples.
    """
    d = np.asarray(differences, dtype=np.float64)
    k, n = d.shape
    members = np.random.default_rng([seed, 1])

    def mean_difference(image_counts):
        member_counts = resample_counts(members, len(image_counts), k)
        return ((member_counts @ d) * image_counts).sum(axis=1) / (k * n)

    values = bootstrap_values(mean_difference, n, resamples, seed)
    share = min(float((values <= 0).mean()), float((values >= 0).mean()))
    return Bootstrap(float(d.mean()), percentiles(values), min(1.0, 2 * share))


@dataclass
class Posterior:
    """What a Bayesian test says of the mean difference (first minus second)."""

    first_better: float  # P(difference > rope)
    equivalent: float  # P(-rope <= difference <= rope)
    second_better: float  # P(difference < -rope)


def bayesian_correlated_t(differences, test_share: float, rope: float) -> Posterior:
    """The Bayesian correlated t-test of paired `differences` (one per fold or seed): the
    posterior of the mean difference is Student's t with k - 1 degrees of freedom, centred on
    the mean difference, with the corrected t-test's variance (1/k + n_test/n_train) s^2
    (`corrected_resampled_t`; 0 for `test_share` of seeds on one split, whose training sets do
    not overlap). `rope`: the region of practical equivalence, +-rope around 0.
    """
    from scipy import stats

    d = np.asarray(differences, dtype=np.float64)
    k = len(d)
    if k < 2:
        raise ValueError("the Bayesian correlated t-test needs two or more paired differences")
    mean, variance = float(d.mean()), float(d.var(ddof=1))
    if variance == 0.0:  # every difference equal: the posterior is a point
        return Posterior(float(mean > rope), float(abs(mean) <= rope), float(mean < -rope))
    posterior = stats.t(k - 1, loc=mean, scale=math.sqrt((1 / k + test_share) * variance))
    below, above = float(posterior.cdf(-rope)), float(posterior.sf(rope))
    return Posterior(above, max(0.0, 1.0 - above - below), below)


def holm(p_values) -> list[float]:
    """Holm's step-down adjustment of the p-values of several comparisons, in their order: the
    i-th smallest is multiplied by (m - i + 1), kept non-decreasing and at most 1. It controls
    the chance of any false claim among the m, under any dependence between them."""
    p = np.asarray(p_values, dtype=np.float64)
    m = len(p)
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted.tolist()
