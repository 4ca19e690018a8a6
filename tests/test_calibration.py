"""Calibration: ECE, Brier and NLL against hand-computed values, temperature scaling that never
raises the validation NLL, and a run that records them."""

from __future__ import annotations

import numpy as np
import pytest

from experiments.evaluation.calibration import (
    Temperature,
    calibration_metrics,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
)

from helpers import client_for, runs_of


def test_the_test_loss_is_keras_cross_entropy():
    """The loss a run reports, computed on the host, is the one Keras trains with: binary and
    sparse categorical cross-entropy, certain (0 and 1) predictions clipped as Keras clips them."""
    import keras

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    positive = rng.uniform(0, 1, (200, 1)).astype("float32")
    positive[:3] = [[0.0], [1.0], [1.0 - labels[2]]]  # certain, and certainly wrong
    keras_binary = keras.losses.BinaryCrossentropy()(labels[:, None].astype("float32"), positive)
    assert negative_log_likelihood(positive, labels) == pytest.approx(
        float(keras.ops.convert_to_numpy(keras_binary)), rel=1e-5
    )
    labels = rng.integers(0, 5, 200)
    probabilities = rng.dirichlet(np.ones(5), 200).astype("float32")
    probabilities[0] = np.eye(5)[(labels[0] + 1) % 5]  # certainly wrong
    keras_sparse = keras.losses.SparseCategoricalCrossentropy()(labels, probabilities)
    assert negative_log_likelihood(probabilities, labels) == pytest.approx(
        float(keras.ops.convert_to_numpy(keras_sparse)), rel=1e-5
    )


def test_ece_equals_the_hand_computed_value():
    # Confidences 0.9 (right), 0.8 (wrong), 0.7 (right), 0.55 (wrong): one per 1/15 bin.
    probabilities = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.45, 0.55]])
    labels = np.array([0, 1, 1, 0])
    assert expected_calibration_error(probabilities, labels) == pytest.approx(
        (0.1 + 0.8 + 0.3 + 0.55) / 4
    )
    # 0.9 (right) and 0.92 (wrong) share the bin (13/15, 14/15]: |0.5 - 0.91| for 2 of 3.
    probabilities = np.array([[0.9, 0.05, 0.05], [0.04, 0.92, 0.04], [0.2, 0.2, 0.6]])
    labels = np.array([0, 0, 2])
    assert expected_calibration_error(probabilities, labels) == pytest.approx(
        2 / 3 * abs(0.5 - 0.91) + 1 / 3 * abs(1 - 0.6)
    )


def test_a_binary_models_single_column_is_the_positive_class():
    positive = np.array([[0.1], [0.8], [0.3], [0.55]])
    labels = np.array([0, 0, 1, 1])
    two_columns = np.hstack([1 - positive, positive])
    one, two = calibration_metrics(positive, labels), calibration_metrics(two_columns, labels)
    assert one == pytest.approx(two)
    assert one["test_brier"] == pytest.approx(np.mean((positive[:, 0] - labels) ** 2))
    p_true = np.where(labels == 1, positive[:, 0], 1 - positive[:, 0])
    assert one["test_nll"] == pytest.approx(-np.log(p_true).mean())
    # Confidences 0.9 right, 0.8 wrong, 0.7 wrong, 0.55 right.
    assert one["test_ece"] == pytest.approx((0.1 + 0.8 + 0.7 + 0.45) / 4)


def test_multiclass_brier_and_nll_match_their_definitions():
    probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.25, 0.5, 0.25]])
    labels = np.array([0, 1, 1])
    metrics = calibration_metrics(probabilities, labels, prefix="val")
    onehot = np.eye(3)[labels]
    assert metrics["val_brier"] == pytest.approx(((probabilities - onehot) ** 2).sum(1).mean())
    assert metrics["val_nll"] == pytest.approx(-np.log([0.7, 0.3, 0.5]).mean())


def softmax(logits):
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@pytest.mark.parametrize("sharpness", [0.3, 1.0, 4.0])  # under-, well- and over-confident
def test_temperature_scaling_never_raises_the_validation_nll(sharpness):
    # Labels drawn from softmax(logits): those probabilities are calibrated by construction, and
    # a model that sharpens them by s is calibrated again at T = s.
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (3000, 5))
    labels = np.array([rng.choice(5, p=row) for row in softmax(logits)])
    probabilities = softmax(logits * sharpness)
    temperature = fit_temperature(probabilities, labels)
    before = calibration_metrics(probabilities, labels)["test_nll"]
    scaled = temperature.apply(probabilities)
    after = calibration_metrics(scaled, labels)["test_nll"]
    assert after <= before + 1e-12
    assert (scaled.argmax(1) == probabilities.argmax(1)).all()  # accuracy is untouched
    assert temperature.value == pytest.approx(sharpness, rel=0.1)  # it undoes the sharpening
    if sharpness == 4.0:
        assert (
            calibration_metrics(scaled, labels)["test_ece"]
            < calibration_metrics(probabilities, labels)["test_ece"]
        )


def test_a_binary_temperature_keeps_the_models_layout():
    positive = np.array([[0.99], [0.02], [0.9], [0.2]])
    scaled = Temperature(2.0).apply(positive)
    assert scaled.shape == (4, 1)
    assert ((scaled > 0.5) == (positive > 0.5)).all() and (
        abs(scaled - 0.5) < abs(positive - 0.5)
    ).all()


def test_a_run_records_calibration_and_its_temperature(make_config, tmp_path):
    from experiments.pipeline.run import train

    train(make_config("trainer.epochs=2", "evaluation.temperature_scaling=true"))
    (run,) = runs_of(tmp_path, "folder")
    metrics = run.data.metrics
    for name in ("test_ece", "test_brier", "test_nll", "test_scaled_ece", "test_scaled_nll"):
        assert np.isfinite(metrics[name]), name
    assert metrics["temperature"] > 0
    assert metrics["val_scaled_nll"] <= metrics["val_nll"] + 1e-9
    artifacts = {a.path for a in client_for(tmp_path).list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/reliability.png", "evaluation/reliability_scaled.png"} <= artifacts


def test_temperature_is_fitted_on_the_exact_logits_of_saturated_outputs():
    """A sigmoid that saturates (many outputs beyond 1 - 1e-7): clipping log-probabilities at
    1e-7 before dividing by T fits another temperature than the logits do. The temperature is
    the one that minimises the NLL of sigmoid(z / T) on the true logits z."""
    from scipy.optimize import minimize_scalar
    from scipy.special import expit

    rng = np.random.default_rng(3)
    z = rng.normal(0, 12, 4000)  # over-confident: |z| > 16 (p beyond 1 - 1e-7) for 18%
    labels = (rng.uniform(size=z.size) < expit(z / 3.0)).astype(int)
    positive = expit(z)[:, None]

    def nll(log_t):
        p = expit(z / np.exp(log_t))
        return -np.mean(np.where(labels == 1, np.log(p), np.log1p(-p)))

    exact = float(np.exp(minimize_scalar(nll, bounds=(-3, 3), method="bounded").x))
    fitted = fit_temperature(positive, labels)
    assert fitted.value == pytest.approx(exact, rel=2e-3)
    from experiments.evaluation.calibration import logits

    recovered = logits(positive)
    finite = np.abs(z) < 16  # where 1 - p keeps its digits in float64
    assert recovered[finite, 1] - recovered[finite, 0] == pytest.approx(z[finite], abs=1e-6)
    # The scaled probabilities are those of the fitted temperature on the true logits.
    scaled = fitted.apply(positive)[finite, 0]
    assert scaled == pytest.approx(expit(z[finite] / fitted.value), abs=1e-9)


def test_adaptive_and_classwise_ece_against_their_hand_computed_values():
    from experiments.evaluation.calibration import (
        adaptive_calibration_error,
        classwise_calibration_error,
    )

    # Confidences 0.55 (wrong), 0.7 (right), 0.8 (wrong), 0.9 (right): two bins of two by mass.
    probabilities = np.array([[0.45, 0.55], [0.3, 0.7], [0.8, 0.2], [0.9, 0.1]])
    labels = np.array([0, 1, 1, 0])
    low, high = abs(0.5 - (0.55 + 0.7) / 2), abs(0.5 - (0.8 + 0.9) / 2)
    assert adaptive_calibration_error(probabilities, labels, bins=2) == pytest.approx(
        (low + high) / 2
    )
    # Classwise, 2 bins of width 0.5: class 0's p = .45 .3 .8 .9 against hits 1 0 0 1.
    class0 = 0.5 * abs(0.5 - 0.375) + 0.5 * abs(0.5 - 0.85)
    class1 = 0.5 * abs(0.5 - 0.625) + 0.5 * abs(0.5 - 0.15)
    assert classwise_calibration_error(probabilities, labels, bins=2) == pytest.approx(
        (class0 + class1) / 2
    )


def test_reliability_bins_mark_the_empty_ones():
    from experiments.evaluation.calibration import reliability_bins

    probabilities = np.array([[0.95, 0.05], [0.9, 0.1], [0.4, 0.6]])
    centers, accuracy, confidence, counts = reliability_bins(probabilities, [0, 1, 1], bins=5)
    assert list(counts) == [0, 0, 1, 0, 2] and counts.sum() == 3
    assert np.isnan(accuracy[[0, 1, 3]]).all() and np.isnan(confidence[[0, 1, 3]]).all()
    assert accuracy[4] == 0.5 and confidence[4] == pytest.approx(0.925)
    assert centers == pytest.approx([0.1, 0.3, 0.5, 0.7, 0.9])


@pytest.mark.parametrize("classes", [2, 4])
def test_brier_is_scikit_learns(classes):
    from sklearn.metrics import brier_score_loss

    from experiments.evaluation.calibration import brier_score

    rng = np.random.default_rng(classes)
    probabilities = rng.dirichlet(np.ones(classes), 300)
    labels = rng.integers(0, classes, 300)
    expected = (
        brier_score_loss(labels, probabilities[:, 1])
        if classes == 2
        else brier_score_loss(labels, probabilities, labels=list(range(classes)))
    )
    assert brier_score(probabilities, labels) == pytest.approx(expected)


def test_each_bootstrap_resample_is_the_statistic_of_the_resampled_images(monkeypatch):
    """The ECE, Brier and macro-F1 intervals compute each resample as a weighted sum: on one
    resample's counts, they equal the functions themselves on the resampled images."""
    from sklearn.metrics import f1_score

    from experiments.evaluation import calibration, reports, statistics
    from experiments.evaluation.calibration import brier_score, calibration_intervals

    rng = np.random.default_rng(7)
    probabilities = rng.dirichlet(np.ones(3) * 0.7, 200)
    labels = rng.integers(0, 3, 200)
    rows = rng.integers(0, 200, 200)  # one resample
    weights = np.bincount(rows, minlength=200)[None, :].astype(float)
    seen = {}

    def capture(statistic, n, **kwargs):
        seen[len(seen)] = float(statistic(weights)[0])
        return (0.0, 1.0)

    monkeypatch.setattr(statistics, "bootstrap_interval", capture)
    calibration_intervals(probabilities, labels)
    assert seen[0] == pytest.approx(
        calibration.expected_calibration_error(probabilities[rows], labels[rows])
    )
    assert seen[1] == pytest.approx(brier_score(probabilities[rows], labels[rows]))
    predicted = probabilities.argmax(1)
    evaluation = reports.Evaluation(
        0.0, 0.0, labels, predicted, probabilities.max(1), probabilities
    )
    metrics = reports.macro_f1_metrics(evaluation, 3)
    assert metrics["test_f1_macro"] == pytest.approx(
        f1_score(labels, predicted, average="macro", zero_division=0)
    )
    assert seen[2] == pytest.approx(
        f1_score(labels[rows], predicted[rows], labels=[0, 1, 2], average="macro", zero_division=0)
    )
