"""A logged model's predictions on image files, as `python -m experiments.predict` runs them
(its usage is there): every file decoded as training decodes it, one CSV row per image with its
class, confidence and top-k, the class names those its source run recorded.
"""

from __future__ import annotations

import csv
import logging
import os
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

    # Every argument is checked before MLflow, Keras or TensorFlow is imported: a typo costs a
    # second, not the 10 s those take.
    files, broken = check_arguments(cfg)
    use_pixel_limit(cfg.get("max_image_pixels"))
    use_backend(cfg.backend)  # before anything imports Keras
    from experiments.model.forward import predict_in_batches

    # It only reads: a read-only or archived store serves it, and nothing is written there.
    tracking.open_store(str(cfg.tracking.uri), writes=False)
    source = tracking.registry.source_run(str(cfg.model))
    class_names = tracking.registry.class_names(source)
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
        "predicted %d images with %s (%d skipped: not decodable, too large, or a broken link): %s",
        len(kept),
        cfg.model,
        len(files) - len(kept) + broken,
        output,
    )
    return len(kept)


def check_arguments(cfg: DictConfig) -> tuple[list[Path], int]:
    """One line for the first bad argument, loading no model; the files of `cfg.input`, and how
    many broken links it holds."""
    from experiments.core.files import check_writable
    from experiments.pipeline.validation import MAX_BATCH, number
    from experiments.tracking import check_store
    from experiments.tracking.registry import check_model_uri

    check_model_uri(str(cfg.model))
    check_store(str(cfg.tracking.uri), must_exist=True, writes=False)
    number(cfg, "top_k", int, low=1)
    number(cfg, "batch_size", int, low=1, high=MAX_BATCH)
    output = Path(str(cfg.output)).expanduser()
    if output.is_dir():
        raise ExperimentError(f"output={cfg.output} is a folder; give the path of a CSV file")
    check_writable(output, f"output={cfg.output}")
    return image_files(Path(str(cfg.input)).expanduser())


def image_files(path: Path) -> tuple[list[Path], int]:
    """`path` itself, or every file under it (hidden ones left out), in a stable order; and how
    many links under it lead nowhere (each is skipped, and counted in one warning)."""
    if path.is_file():
        return [path], 0
    if path.is_symlink() and not path.exists():
        raise ExperimentError(f"input={path} is a link to {os.readlink(path)}, which is not there")
    if not path.is_dir():
        raise ExperimentError(f"input={path} is neither a file nor a folder")
    entries = [p for p in path.rglob("*") if not p.name.startswith(".")]
    broken = sorted(p for p in entries if p.is_symlink() and not p.exists())
    if broken:
        shown = ", ".join(str(p) for p in broken[:3]) + (", ..." if len(broken) > 3 else "")
        log.warning("skipping %d broken link(s) under %s: %s", len(broken), path, shown)
    files = sorted(p for p in entries if p.is_file())
    if not files:
        raise ExperimentError(
            f"input={path} holds no files{f' (only {len(broken)} broken links)' if broken else ''}"
            f"; point it at a folder of images"
        )
    return files, len(broken)


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
