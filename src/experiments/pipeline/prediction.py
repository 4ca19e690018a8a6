"""A logged model's predictions on image files, as `python -m experiments.predict` runs them
(its usage is there): every file decoded as training decodes it, one CSV row per image with its
class, confidence and top-k, the class names those its source run recorded.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from experiments.core.errors import ExperimentError

log = logging.getLogger("experiments.predict")


def predict(cfg: DictConfig) -> int:
    """Predict every image of `cfg.input` with `cfg.model`; the number of images predicted."""
    from experiments import tracking
    from experiments.core.backend import use_backend
    from experiments.data.decoding import use_pixel_limit
    from experiments.evaluation.calibration import class_probabilities

    use_pixel_limit(cfg.get("max_image_pixels"))  # a bad value is one line, before any work
    use_backend(cfg.backend)  # before anything imports Keras
    from experiments.model.forward import predict_in_batches

    tracking.open_store(str(cfg.tracking.uri), cfg.tracking.get("outbox_dir"))
    source = tracking.registry.source_run(str(cfg.model))
    class_names = tracking.registry.class_names(source)
    files = image_files(Path(str(cfg.input)).expanduser())
    model = tracking.load_model(str(cfg.model))
    images, kept = decode_all(files, tuple(model.input_shape[1:3]))
    if not kept:
        raise ExperimentError(f"input={cfg.input}: none of its {len(files)} files is an image")
    outputs = []
    predict_in_batches(
        model, images, batch_size=int(cfg.batch_size), what="predicting", write=outputs.append
    )
    probabilities = class_probabilities(np.concatenate(outputs))
    if probabilities.shape[1] != len(class_names):
        raise ExperimentError(
            f"model={cfg.model} outputs {probabilities.shape[1]} classes but its run recorded "
            f"{len(class_names)}: {', '.join(class_names)}"
        )
    output = Path(str(cfg.output))
    write_predictions(output, kept, probabilities, class_names, int(cfg.top_k))
    log.info(
        "predicted %d images with %s (%d skipped: not decodable, or too large): %s",
        len(kept),
        cfg.model,
        len(files) - len(kept),
        output,
    )
    return len(kept)


def image_files(path: Path) -> list[Path]:
    """`path` itself, or every file under it (hidden ones left out), in a stable order."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ExperimentError(f"input={path} is neither a file nor a folder")
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ExperimentError(f"input={path} holds no files; point it at a folder of images")
    return files


def decode_all(files: list[Path], size: tuple[int, int]) -> tuple[np.ndarray, list[Path]]:
    """The decodable files as uint8 images of `size`, as training decodes them (EXIF turned,
    16-bit scaled), and which files they are."""
    from experiments.core.progress import progress
    from experiments.data.decoding import decode_image

    images, kept = [], []
    with progress("decoding images", len(files)) as advance:
        for path in files:
            decoded = decode_image(path, size)
            if decoded is not None:
                images.append(decoded.image)
                kept.append(path)
            advance(1)
    shape = (0, *size, 3)
    return (np.stack(images) if images else np.zeros(shape, np.uint8)), kept


def write_predictions(path: Path, files, probabilities, class_names, top_k: int) -> None:
    """The CSV: path, class, confidence, and `top_k` (class, probability) pairs."""
    k = min(top_k, len(class_names))
    order = np.argsort(-probabilities, axis=1)[:, :k]
    header = ["path", "class", "confidence"]
    for rank in range(1, k + 1):
        header += [f"top{rank}_class", f"top{rank}_probability"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for file, row, ranked in zip(files, probabilities, order, strict=True):
            cells = [str(file), class_names[ranked[0]], f"{row[ranked[0]]:.6f}"]
            for index in ranked:
                cells += [class_names[index], f"{row[index]:.6f}"]
            writer.writerow(cells)
