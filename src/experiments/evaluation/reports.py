"""Evaluation of a split and the artifacts that explain it: curves, confusion, reports, grids."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GRID_VIEWS = 9
MAX_MISCLASSIFIED = 16
# The misclassified grid: the longer side of each image, and its captions' size, in pixels
GRID_CELL = 256
GRID_FONT = 18


@dataclass
class Evaluation:
    """Predictions on one split with their loss and accuracy."""

    loss: float
    accuracy: float
    labels: np.ndarray
    predictions: np.ndarray
    confidence: np.ndarray  # the probability of the predicted class
    probabilities: np.ndarray  # as the model outputs them


# Images a batch when a split is evaluated (or the size near it that divides the split).
EVALUATION_BATCH = 64


def evaluate_split(
    model, split, num_classes: int, batch_size: int = EVALUATION_BATCH
) -> Evaluation:
    """Loss, accuracy and per-image predictions of `model` on a split of raw uint8 images."""
    from experiments.evaluation.calibration import negative_log_likelihood
    from experiments.model.forward import predict_in_batches

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


def paired_comparison(this: Evaluation, other: Evaluation):
    """Whether `this` and `other`, evaluated on the same images, differ in accuracy
    (`evaluation.statistics.paired_accuracy`, which `compare --significance` also uses)."""
    from experiments.evaluation.statistics import paired_accuracy

    if not np.array_equal(this.labels, other.labels):
        raise ValueError("the two evaluations are not of the same images")
    return paired_accuracy(this.predictions == this.labels, other.predictions == other.labels)


def write_reports(
    outdir: Path, evaluation: Evaluation, split, class_names, name: str = "test"
) -> list[Path]:
    """Write the evaluation artifacts of `split` into `outdir`; the files written. (A training
    run writes its own, with its curves, while it logs its model: `train.record_results`.)"""
    from experiments.evaluation import figures

    drawing = figures.draw(report_figures(outdir, evaluation, split, class_names))
    return [
        *classification_reports(outdir, evaluation, class_names),
        *write_predictions(outdir, evaluation, split, class_names, name),
        *drawing.results(),
    ]


def report_figures(
    outdir: Path,
    evaluation: Evaluation,
    split,
    class_names: list[str],
    history: dict[str, list[float]] | None = None,
    augmentation=None,
) -> list:
    """The report's figures as calls `(function, arguments)` of plain arrays, each writing one
    PNG into `outdir` and returning its path: they can be drawn in another process
    (`experiments.evaluation.figures`). What needs the model or the whole split is computed here."""
    from experiments.evaluation.calibration import reliability_png

    outdir = Path(outdir).absolute()  # where the worker writes, whatever its directory
    outdir.mkdir(parents=True, exist_ok=True)
    calls = [
        (confusion_matrix_png, (outdir / "confusion_matrix.png", evaluation, class_names)),
        (
            misclassified_grid_png,
            (outdir / "misclassified.png", *misclassified(evaluation, split, class_names)),
        ),
        (
            reliability_png,
            (outdir / "reliability.png", evaluation.probabilities, evaluation.labels, "test"),
        ),
    ]
    if history:
        calls.append((learning_curves_png, (outdir / "learning_curves.png", history)))
    if augmentation is not None:
        from experiments.model.augmentation import augmented_views

        image = split.images[0].astype("float32")
        views = augmented_views(augmentation, np.repeat(image[None], GRID_VIEWS, 0))
        calls.append((views_png, (outdir / "augmented_views.png", views)))
    return calls


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


def write_predictions(
    outdir: Path, evaluation: Evaluation, split, class_names, name: str = "test"
) -> list[Path]:
    """Every image's prediction, for error analysis and paired tests between runs after the
    run: `predictions_<name>.csv` (a row per image in the split's order: its index, its source
    file, the true and predicted class and each class's probability) and
    `predictions_<name>.json` (the split's digest, of its files and labels, by which two runs'
    predictions are matched image by image; the class names; the row count)."""
    import csv

    from experiments.evaluation.calibration import class_probabilities

    probabilities = class_probabilities(evaluation.probabilities)
    table, meta = outdir / f"predictions_{name}.csv", outdir / f"predictions_{name}.json"
    outdir.mkdir(parents=True, exist_ok=True)
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", "source", "label", "predicted", *(f"p_{c}" for c in class_names)])
        for i, (source, label, predicted) in enumerate(
            zip(split.sources, evaluation.labels, evaluation.predictions, strict=True)
        ):
            row = [f"{p:.6g}" for p in probabilities[i]]
            writer.writerow([i, source, class_names[label], class_names[predicted], *row])
    meta.write_text(
        json.dumps(
            {
                "split": name,
                "digest": split.digest(),
                "rows": len(evaluation.labels),
                "class_names": list(class_names),
            },
            indent=2,
        )
    )
    return [table, meta]


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


def macro_f1_metrics(evaluation: Evaluation, num_classes: int, split: str = "test") -> dict:
    """`<split>_f1_macro` (scikit-learn's macro F1, a class without any prediction or image
    counting 0) and its 95% bootstrap interval over the images (`_ci95_low`, `_ci95_high`).
    Each class's true and false positives and false negatives are sums over images, so each
    resample is one matrix product (`statistics.bootstrap_interval`)."""
    from sklearn.metrics import f1_score

    from experiments.evaluation.statistics import bootstrap_interval

    labels, predicted = np.asarray(evaluation.labels), np.asarray(evaluation.predictions)
    classes = np.arange(num_classes)
    is_label, is_predicted = labels[:, None] == classes, predicted[:, None] == classes
    true_pos = (is_label & is_predicted).astype(float)
    false_pos = (~is_label & is_predicted).astype(float)
    false_neg = (is_label & ~is_predicted).astype(float)

    def macro(weights):
        tp, fp, fn = weights @ true_pos, weights @ false_pos, weights @ false_neg
        denominator = 2 * tp + fp + fn
        f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
        return f1.mean(axis=1)

    low, high = bootstrap_interval(macro, len(labels))
    score = f1_score(labels, predicted, labels=classes, average="macro", zero_division=0)
    return {
        f"{split}_f1_macro": float(score),
        f"{split}_f1_macro_ci95_low": low,
        f"{split}_f1_macro_ci95_high": high,
    }


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
    """Up to 16 misclassified images, most confident first, with true, predicted, confidence."""
    return misclassified_grid_png(path, *misclassified(evaluation, split, class_names))


def misclassified(evaluation: Evaluation, split, class_names) -> tuple[np.ndarray, list[str]]:
    """The up to 16 misclassified images of `split`, most confident first, and their captions:
    true class, predicted class and confidence."""
    wrong = np.flatnonzero(evaluation.predictions != evaluation.labels)
    wrong = wrong[np.argsort(-evaluation.confidence[wrong])][:MAX_MISCLASSIFIED]
    captions = [
        f"true {class_names[evaluation.labels[i]]}\n"
        f"pred {class_names[evaluation.predictions[i]]} ({evaluation.confidence[i]:.0%})"
        for i in wrong
    ]
    images = np.asarray(split.images[np.sort(wrong)])[np.argsort(np.argsort(wrong))]
    return images, captions


def misclassified_grid_png(path: Path, images: np.ndarray, captions: list[str]) -> Path:
    """`images` in rows of four, each under its caption, scaled to about GRID_CELL pixels.

    Drawn with Pillow in matplotlib's font: matplotlib laid out the 32 lines of captions in
    0.2-0.3 s, most of a sweep trial's figures; Pillow draws them in milliseconds.
    """
    from matplotlib import font_manager
    from PIL import Image, ImageDraw, ImageFont

    height, width = images.shape[1:3]
    scale = GRID_CELL / max(height, width)
    if scale >= 1:  # small images grow by whole pixels, as they are
        scale, resample = float(int(scale)), Image.NEAREST
    else:
        resample = Image.BILINEAR
    size = (round(width * scale), round(height * scale))
    font = ImageFont.truetype(font_manager.findfont("DejaVu Sans"), GRID_FONT)
    line = GRID_FONT + 4
    gap, caption = 12, 2 * line + 6
    cell_w, cell_h = max(size[0], 14 * GRID_FONT) + gap, caption + size[1] + gap
    cols = 4
    rows = max(1, int(np.ceil(len(images) / cols)))
    grid = Image.new("RGB", (cols * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for k, (image, text) in enumerate(zip(images, captions, strict=True)):
        left, top = (k % cols) * cell_w + gap // 2, (k // cols) * cell_h + caption
        center = left + (cell_w - gap) // 2
        grid.paste(Image.fromarray(image).resize(size, resample), (center - size[0] // 2, top))
        lines = text.split("\n")
        for i, words in enumerate(lines):
            while len(words) > 2 and draw.textlength(words, font=font) > cell_w - gap:
                words = words[:-2] + "…"  # a long class name, cut to its cell
            y = top - 4 - (len(lines) - 1 - i) * line
            draw.text((center, y), words, fill="black", font=font, anchor="md")
    if not len(images):
        draw.text(
            (grid.width // 2, grid.height // 2),
            "no misclassified images",
            fill="black",
            font=font,
            anchor="mm",
        )
    grid.save(path)
    return path


def views_png(path: Path, views: np.ndarray) -> Path:
    """Nine augmented views of one image in a 3x3 grid."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 3, figsize=(7, 7))
    for ax, view in zip(axes.flat, views, strict=True):
        ax.imshow(np.clip(view, 0, 255).astype(np.uint8))
        ax.axis("off")
    fig.suptitle("augmented views of one training image")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
