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


def _binned(probabilities, labels, bins: int):
    """(confidence, whether the top class is right, bin index) of each prediction. Bin b holds
    confidences in (b/bins, (b+1)/bins]; a confidence of 0 joins the first."""
    probabilities = class_probabilities(probabilities)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(labels)
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    return confidence, correct, which


def calibration_metrics(probabilities, labels, prefix: str = "test") -> dict[str, float]:
    """`<prefix>_ece`, `<prefix>_brier` (scikit-learn's: the mean squared error of the positive
    probability for two classes, of the probability vector for more) and `<prefix>_nll`."""
    from sklearn.metrics import brier_score_loss

    probabilities = class_probabilities(probabilities)
    labels = np.asarray(labels)
    classes = list(range(probabilities.shape[1]))
    if len(classes) == 2:
        brier = brier_score_loss(labels, probabilities[:, 1], labels=classes)
    else:
        brier = brier_score_loss(labels, probabilities, labels=classes)
    return {
        f"{prefix}_ece": expected_calibration_error(probabilities, labels),
        f"{prefix}_brier": float(brier),
        f"{prefix}_nll": negative_log_likelihood(probabilities, labels),
    }


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
        scaled = _softmax(_logits(class_probabilities(original)) / self.value)
        return scaled[:, 1:] if original.ndim == 2 and original.shape[1] == 1 else scaled


def fit_temperature(probabilities, labels) -> Temperature:
    """The temperature that minimises the negative log-likelihood of `labels` (the validation
    split's), searched on log T in [1/20, 20]; T = 1 when nothing beats it, so that scaling
    never raises the validation NLL."""
    from scipy.optimize import minimize_scalar

    logits = _logits(class_probabilities(probabilities))
    labels = np.asarray(labels)

    def nll(log_t: float) -> float:
        scaled = np.clip(_softmax(logits / np.exp(log_t)), EPS, 1.0)
        return float(-np.log(scaled[np.arange(len(labels)), labels]).mean())

    found = minimize_scalar(nll, bounds=(-np.log(20), np.log(20)), method="bounded")
    best = float(np.exp(found.x)) if found.success and nll(found.x) < nll(0.0) else 1.0
    return Temperature(best)


def _logits(probabilities: np.ndarray) -> np.ndarray:
    """Logits whose softmax gives `probabilities` (up to a constant per row)."""
    return np.log(np.clip(probabilities, EPS, 1.0))


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def reliability_png(path: Path, probabilities, labels, title: str = "") -> Path:
    """The reliability diagram: accuracy against confidence per bin (the diagonal is perfect
    calibration), with how many predictions each bin holds."""
    import matplotlib.pyplot as plt

    _, correct, which = _binned(probabilities, labels, BINS)
    centers = (np.arange(BINS) + 0.5) / BINS
    counts = np.bincount(which, minlength=BINS)
    accuracy = np.array([correct[which == b].mean() if counts[b] else 0.0 for b in range(BINS)])
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    top.bar(centers, accuracy, width=1 / BINS, edgecolor="black", label="accuracy")
    top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ece = expected_calibration_error(probabilities, labels)
    top.set_title(f"{title} reliability (ECE {ece:.3f}, {BINS} bins)".strip())
    top.set_ylabel("accuracy")
    top.legend(loc="upper left")
    bottom.bar(centers, counts, width=1 / BINS, color="gray", edgecolor="black")
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("predictions")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
