"""Evaluation of a split and the artifacts that explain it: curves, confusion, reports, grids."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GRID_VIEWS = 9
MAX_MISCLASSIFIED = 16


@dataclass
class Evaluation:
    """Predictions on one split with their loss and accuracy."""

    loss: float
    accuracy: float
    labels: np.ndarray
    predictions: np.ndarray
    confidence: np.ndarray  # the probability of the predicted class
    probabilities: np.ndarray  # as the model outputs them


def evaluate_split(model, split, num_classes: int, batch_size: int = 64) -> Evaluation:
    """Loss, accuracy and per-image predictions of `model` on a split of raw uint8 images."""
    from experiments.calibration import negative_log_likelihood
    from experiments.inputs import predict_in_batches

    outputs = []
    predict_in_batches(
        model, split.images, batch_size=batch_size, what="evaluating", write=outputs.append
    )
    probabilities = np.concatenate(outputs)
    labels = split.labels
    if num_classes == 2:
        positive = probabilities[:, 0]
        predictions = (positive >= 0.5).astype(np.int32)
        confidence = np.where(predictions == 1, positive, 1.0 - positive)
    else:
        predictions = probabilities.argmax(axis=1).astype(np.int32)
        confidence = probabilities.max(axis=1)
    return Evaluation(
        loss=negative_log_likelihood(probabilities, labels),
        accuracy=float((predictions == labels).mean()),
        labels=labels,
        predictions=predictions,
        confidence=confidence,
        probabilities=probabilities,
    )


@dataclass
class PairedComparison:
    """Two models' predictions on the same images: accuracies, difference and McNemar's test."""

    accuracy: float
    other_accuracy: float
    only_this_right: int  # images this model gets right and the other wrong
    only_other_right: int
    p_value: float  # McNemar's exact test: a two-sided binomial test on the discordant images
    ci95: tuple[float, float]  # the difference's 95% interval (Wald, for paired proportions)

    @property
    def difference(self) -> float:
        return self.accuracy - self.other_accuracy


def paired_comparison(this: Evaluation, other: Evaluation) -> PairedComparison:
    """Whether `this` and `other`, evaluated on the same images, differ in accuracy.

    McNemar's exact test looks only at the images where the two disagree on being right; the
    shared ones say nothing about the difference. scipy's binomial test computes it.
    """
    from scipy import stats

    if not np.array_equal(this.labels, other.labels):
        raise ValueError("the two evaluations are not of the same images")
    right, other_right = this.predictions == this.labels, other.predictions == other.labels
    b, c, n = int((right & ~other_right).sum()), int((~right & other_right).sum()), len(right)
    p_value = stats.binomtest(b, b + c, 0.5).pvalue if b + c else 1.0
    difference = (b - c) / n
    half = 1.96 * np.sqrt(max((b + c) / n - difference**2, 0.0) / n)
    return PairedComparison(
        accuracy=this.accuracy,
        other_accuracy=other.accuracy,
        only_this_right=b,
        only_other_right=c,
        p_value=float(p_value),
        ci95=(float(difference - half), float(difference + half)),
    )


def write_reports(
    outdir: Path,
    evaluation: Evaluation,
    split,
    class_names: list[str],
    history: dict[str, list[float]] | None = None,
    augmentation=None,
) -> list[Path]:
    """Write the evaluation artifacts into `outdir`; the files written."""
    import matplotlib

    matplotlib.use("Agg")
    outdir.mkdir(parents=True, exist_ok=True)
    from experiments.calibration import reliability_png

    written = [
        *classification_reports(outdir, evaluation, class_names),
        confusion_matrix_png(outdir / "confusion_matrix.png", evaluation, class_names),
        misclassified_png(outdir / "misclassified.png", evaluation, split, class_names),
        reliability_png(
            outdir / "reliability.png", evaluation.probabilities, evaluation.labels, "test"
        ),
    ]
    if history:
        written.append(learning_curves_png(outdir / "learning_curves.png", history))
    if augmentation is not None:
        written.append(
            augmented_views_png(outdir / "augmented_views.png", split.images[0], augmentation)
        )
    return written


def classification_reports(outdir: Path, evaluation: Evaluation, class_names) -> list[Path]:
    """scikit-learn's per-class precision, recall and F1, as text and as JSON."""
    from sklearn.metrics import classification_report

    labels = list(range(len(class_names)))
    kwargs = dict(labels=labels, target_names=class_names, zero_division=0, digits=4)
    text = classification_report(evaluation.labels, evaluation.predictions, **kwargs)
    data = classification_report(
        evaluation.labels, evaluation.predictions, output_dict=True, **kwargs
    )
    (outdir / "classification_report.txt").write_text(text)
    (outdir / "classification_report.json").write_text(json.dumps(data, indent=2))
    return [outdir / "classification_report.txt", outdir / "classification_report.json"]


def per_class_metrics(evaluation: Evaluation, class_names, split: str = "test") -> dict:
    """Precision, recall and F1 of each class as metrics named by class, e.g.
    `test_f1/daisy`: the UI charts each kind in a section of its own and the runs table can
    sort by any of them. Characters MLflow refuses in a metric name become `_`."""
    import re

    from sklearn.metrics import precision_recall_fscore_support

    labels = list(range(len(class_names)))
    scores = precision_recall_fscore_support(
        evaluation.labels, evaluation.predictions, labels=labels, zero_division=0
    )
    metrics = {}
    for kind, values in zip(("precision", "recall", "f1"), scores[:3], strict=True):
        for name, value in zip(class_names, values, strict=True):
            safe = re.sub(r"[^\w\-. ]", "_", str(name))
            metrics[f"{split}_{kind}/{safe}"] = float(value)
    return metrics


def confusion_matrix_png(path: Path, evaluation: Evaluation, class_names) -> Path:
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    size = max(4.0, 0.6 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay.from_predictions(
        evaluation.labels,
        evaluation.predictions,
        labels=list(range(len(class_names))),
        display_labels=class_names,
        ax=ax,
        colorbar=False,
        xticks_rotation=45,
    )
    ax.set_title(f"accuracy {evaluation.accuracy:.2%}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def learning_curves_png(path: Path, history: dict[str, list[float]]) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for key, style in ((metric, "-"), (f"val_{metric}", "--")):
            if history.get(key):
                ax.plot(range(1, len(history[key]) + 1), history[key], style, label=key)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def misclassified_png(path: Path, evaluation: Evaluation, split, class_names) -> Path:
    """Up to 16 misclassified images, most confident first, with true, predicted, confidence.

    The images are tiled into one picture drawn on one plot with a caption each: 16 plots of one
    image took 0.3 s of every run, most of a sweep trial's reports.
    """
    import matplotlib.pyplot as plt

    wrong = np.flatnonzero(evaluation.predictions != evaluation.labels)
    wrong = wrong[np.argsort(-evaluation.confidence[wrong])][:MAX_MISCLASSIFIED]
    cols = 4
    rows = max(1, int(np.ceil(len(wrong) / cols)))
    height, width = split.images.shape[1:3]
    gap, caption = max(2, width // 8), max(8, height // 3)  # in image pixels
    cell_h, cell_w = caption + height + gap, width + gap
    tiles = np.full((rows * cell_h, cols * cell_w, 3), 255, np.uint8)
    fig = plt.figure(figsize=(3 * cols, 3 * cols * tiles.shape[0] / tiles.shape[1]))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.axis("off")
    for k, i in enumerate(wrong):
        top, left = (k // cols) * cell_h + caption, (k % cols) * cell_w + gap // 2
        tiles[top : top + height, left : left + width] = split.images[i]
        ax.text(
            left + width / 2,
            top - 1,
            f"true {class_names[evaluation.labels[i]]}\n"
            f"pred {class_names[evaluation.predictions[i]]} "
            f"({evaluation.confidence[i]:.0%})",
            ha="center",
            va="bottom",
            fontsize=9,
        )
    ax.imshow(tiles, interpolation="nearest")
    if not len(wrong):
        ax.text(tiles.shape[1] / 2, tiles.shape[0] / 2, "no misclassified images", ha="center")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def augmented_views_png(path: Path, image: np.ndarray, augmentation) -> Path:
    """A 3x3 grid of one training image through the augmentation layers in training mode."""
    import matplotlib.pyplot as plt

    from experiments.augmentation import augmented_views

    views = augmented_views(augmentation, np.repeat(image[None].astype("float32"), GRID_VIEWS, 0))
    fig, axes = plt.subplots(3, 3, figsize=(7, 7))
    for ax, view in zip(axes.flat, views, strict=True):
        ax.imshow(np.clip(view, 0, 255).astype(np.uint8))
        ax.axis("off")
    fig.suptitle("augmented views of one training image")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
