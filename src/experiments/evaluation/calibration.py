"""How far a model's confidence can be trusted: expected calibration error, Brier score and
negative log-likelihood of a split's predictions, the reliability diagram, and temperature
scaling fitted on the validation split (`evaluation.temperature_scaling=true`).

Binary models output the positive class's probability (one column); it is read as the two
columns [1 - p, p] here, so that both kinds go through the same formulas.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

BINS = 15  # the customary ECE bins (Guo et al., 2017)
EPS = 1e-7  # probabilities are clipped to [EPS, 1 - EPS] before a log


def class_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """A model's outputs as one probability per class, each row summing to 1: a binary model's
    single column becomes [1 - p, p]."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim == 1 or probabilities.shape[1] == 1:
        positive = probabilities.reshape(-1)
        return np.stack([1.0 - positive, positive], axis=1)
    # A float32 softmax sums to 1 within ~1e-6 only; scikit-learn's checks want 1.
    return probabilities / probabilities.sum(axis=1, keepdims=True)


def expected_calibration_error(probabilities, labels, bins: int = BINS) -> float:
    """ECE: over `bins` equal-width bins of confidence (the top class's probability), the
    share of predictions in each bin times the gap between its accuracy and its mean confidence.

    Our own: scikit-learn has the binary reliability curve (`calibration_curve`) but no ECE, and
    ECE is about the top class of any number of classes.
    """
    confidence, correct, which = _binned(probabilities, labels, bins)
    error = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            error += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(error)


def adaptive_calibration_error(probabilities, labels, bins: int = BINS) -> float:
    """ECE over equal-mass bins (each holds n/bins predictions, by confidence): where most
    predictions are confident, equal-width bins leave most bins empty and one bin holds almost
    everything (Nixon et al., 2019)."""
    confidence, correct, _ = _binned(probabilities, labels, bins)
    order = np.argsort(confidence, kind="stable")
    error = 0.0
    for chunk in np.array_split(order, min(bins, len(order))):
        if len(chunk):
            share = len(chunk) / len(order)
            error += share * abs(correct[chunk].mean() - confidence[chunk].mean())
    return float(error)


def classwise_calibration_error(probabilities, labels, bins: int = BINS) -> float:
    """Classwise ECE: for each class, the ECE of its own probability against whether the image
    is of that class, over `bins` equal-width bins; their mean over classes (Kull et al., 2019).
    It sees the calibration of every class's probability, not only the top one's."""
    probabilities = class_probabilities(probabilities)
    labels = np.asarray(labels)
    errors = []
    for k in range(probabilities.shape[1]):
        p, hit = probabilities[:, k], labels == k
        which = np.clip(np.ceil(p * bins).astype(int) - 1, 0, bins - 1)
        error = 0.0
        for b in range(bins):
            inside = which == b
            if inside.any():
                error += inside.mean() * abs(hit[inside].mean() - p[inside].mean())
        errors.append(error)
    return float(np.mean(errors))


def reliability_bins(probabilities, labels, bins: int = BINS):
    """Per equal-width bin of confidence: (its centre, its accuracy, its mean confidence, how
    many predictions it holds); the accuracy and confidence of an empty bin are nan."""
    confidence, correct, which = _binned(probabilities, labels, bins)
    counts = np.bincount(which, minlength=bins)
    accuracy = np.full(bins, np.nan)
    mean_confidence = np.full(bins, np.nan)
    for b in np.flatnonzero(counts):
        accuracy[b] = correct[which == b].mean()
        mean_confidence[b] = confidence[which == b].mean()
    return (np.arange(bins) + 0.5) / bins, accuracy, mean_confidence, counts


def _binned(probabilities, labels, bins: int):
    """(confidence, whether the top class is right, bin index) of each prediction. Bin b holds
    confidences in (b/bins, (b+1)/bins]; a confidence of 0 joins the first."""
    probabilities = class_probabilities(probabilities)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(labels)
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    return confidence, correct, which


def calibration_metrics(
    probabilities, labels, prefix: str = "test", intervals: bool = False
) -> dict[str, float]:
    """`<prefix>_ece` (over `BINS` equal-width bins, recorded as `<prefix>_ece_bins`), its
    equal-mass (`_ece_adaptive`) and classwise (`_ece_classwise`) kinds, `<prefix>_brier`
    (scikit-learn's: the mean squared error of the positive probability for two classes, of the
    probability vector for more) and `<prefix>_nll`. With `intervals`, the 95% bootstrap
    intervals of the ECE and the Brier score over the images (`_ci95_low`, `_ci95_high`).

    ECE's estimator is biased upward on few images (a bin's gap is an absolute value of a noisy
    difference), so read it with its interval and beside the adaptive kind.
    """
    probabilities = class_probabilities(probabilities)
    labels = np.asarray(labels)
    metrics = {
        f"{prefix}_ece": expected_calibration_error(probabilities, labels),
        f"{prefix}_ece_bins": float(BINS),
        f"{prefix}_ece_adaptive": adaptive_calibration_error(probabilities, labels),
        f"{prefix}_ece_classwise": classwise_calibration_error(probabilities, labels),
        f"{prefix}_brier": brier_score(probabilities, labels),
        f"{prefix}_nll": negative_log_likelihood(probabilities, labels),
    }
    if intervals:
        metrics |= calibration_intervals(probabilities, labels, prefix)
    return metrics


def calibration_intervals(probabilities, labels, prefix: str = "test") -> dict[str, float]:
    """The 95% bootstrap intervals over the images of the ECE and the Brier score. Both are
    sums over images (the ECE's per bin, before the absolute value), so each resample is one
    matrix product of the resample's counts (`statistics.bootstrap_interval`)."""
    from experiments.evaluation.statistics import bootstrap_interval

    probabilities = class_probabilities(probabilities)
    labels = np.asarray(labels)
    n = len(labels)
    confidence, correct, which = _binned(probabilities, labels, BINS)
    gaps = np.zeros((n, BINS))
    gaps[np.arange(n), which] = correct - confidence  # each image's share of its bin's gap
    squared = squared_errors(probabilities, labels)
    out = {}
    for name, statistic in (
        ("ece", lambda w: np.abs(w @ gaps).sum(axis=1) / n),
        ("brier", lambda w: w @ squared / n),
    ):
        out[f"{prefix}_{name}_ci95_low"], out[f"{prefix}_{name}_ci95_high"] = bootstrap_interval(
            statistic, n
        )
    return out


def brier_score(probabilities, labels) -> float:
    """The Brier score as scikit-learn's `brier_score_loss` gives it: the mean squared error of
    the positive probability for two classes, of the whole probability vector (summed over
    classes) for more."""
    return float(np.mean(squared_errors(probabilities, labels)))


def squared_errors(probabilities, labels) -> np.ndarray:
    """Each image's part of the Brier score: the squared error of its positive probability
    (two classes), or of its probability vector summed over classes (more)."""
    probabilities = class_probabilities(probabilities)
    labels = np.asarray(labels)
    if probabilities.shape[1] == 2:
        return (probabilities[:, 1] - (labels == 1)) ** 2
    return ((probabilities - np.eye(probabilities.shape[1])[labels]) ** 2).sum(axis=1)


def negative_log_likelihood(probabilities, labels) -> float:
    """The mean negative log-probability of the true classes, probabilities clipped to
    [EPS, 1 - EPS] as Keras' binary and sparse categorical cross-entropy clip them (scikit-learn's
    `log_loss`, in float64, on the host: Keras' losses called eagerly compile each of their ops
    on JAX, 0.3-0.5 s on this project's CPU)."""
    from sklearn.metrics import log_loss

    probabilities = class_probabilities(probabilities)
    clipped = np.clip(probabilities, EPS, 1 - EPS)
    clipped /= clipped.sum(axis=1, keepdims=True)
    return float(log_loss(labels, clipped, labels=list(range(probabilities.shape[1]))))


@dataclass
class Temperature:
    """One temperature T that divides the logits: T > 1 softens over-confident predictions."""

    value: float

    def apply(self, probabilities) -> np.ndarray:
        """`probabilities` rescaled by T, in the model's own layout (one column for binary)."""
        original = np.asarray(probabilities, dtype=np.float64)
        scaled = _softmax(logits(original) / self.value)
        return scaled[:, 1:] if original.ndim == 2 and original.shape[1] == 1 else scaled


def fit_temperature(probabilities, labels) -> Temperature:
    """The temperature that minimises the negative log-likelihood of `labels` (the validation
    split's), searched on log T in [1/20, 20]; T = 1 when nothing beats it, so that scaling
    never raises the validation NLL. It fits on the logits the outputs came from, recovered
    exactly (`logits`), not on clipped log-probabilities."""
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    z = logits(probabilities)
    labels = np.asarray(labels)
    rows = np.arange(len(labels))

    def nll(log_t: float) -> float:
        return float(-log_softmax(z / np.exp(log_t), axis=1)[rows, labels].mean())

    found = minimize_scalar(nll, bounds=(-np.log(20), np.log(20)), method="bounded")
    best = float(np.exp(found.x)) if found.success and nll(found.x) < nll(0.0) else 1.0
    return Temperature(best)


def logits(probabilities) -> np.ndarray:
    """The logits a softmax or sigmoid output came from, one column per class, up to a constant
    per row: log p for a softmax, [0, log p - log(1 - p)] for a sigmoid's p. Exact up to the
    outputs' float precision; a probability that rounded to 0 (or a sigmoid's to 1) is read as
    the smallest one float64 holds, the nearest logit there is."""
    original = np.asarray(probabilities, dtype=np.float64)
    tiny = np.finfo(np.float64).tiny
    if original.ndim == 1 or original.shape[1] == 1:
        p = np.clip(original.reshape(-1), tiny, 1.0)
        q = np.clip(1.0 - original.reshape(-1), tiny, 1.0)
        return np.stack([np.zeros_like(p), np.log(p) - np.log(q)], axis=1)
    return np.log(np.clip(class_probabilities(original), tiny, 1.0))


def _softmax(z: np.ndarray) -> np.ndarray:
    shifted = np.exp(z - z.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def reliability_png(path: Path, probabilities, labels, title: str = "") -> Path:
    """The reliability diagram: accuracy against confidence per bin (the diagonal is perfect
    calibration), with how many predictions each bin holds, written on it; an empty bin has no
    bar but a mark."""
    import matplotlib.pyplot as plt

    centers, accuracy, _, counts = reliability_bins(probabilities, labels)
    empty = counts == 0
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    full = ~empty
    top.bar(centers[full], accuracy[full], width=1 / BINS, edgecolor="black", label="accuracy")
    if empty.any():  # no prediction there: no bar, a mark, not a zero accuracy
        top.scatter(
            centers[empty], np.zeros(empty.sum()), marker="x", color="gray", label="empty bin"
        )
    top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ece = expected_calibration_error(probabilities, labels)
    top.set_title(f"{title} reliability (ECE {ece:.3f}, {BINS} bins)".strip())
    top.set_ylabel("accuracy")
    top.legend(loc="upper left")
    bottom.bar(centers, counts, width=1 / BINS, color="gray", edgecolor="black")
    for x, count in zip(centers[full], counts[full], strict=True):
        bottom.annotate(str(count), (x, count), ha="center", va="bottom", fontsize=6)
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("predictions")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
