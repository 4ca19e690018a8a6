"""The task group: a dataset decoded once into uint8 arrays and split into train, val and test.

Images are decoded with Pillow rather than `keras.utils.image_dataset_from_directory`, because
that decodes every epoch, crashes mid-epoch on a truncated or non-image file, and cannot read CMYK
JPEGs. Here every file is decoded once, converted to RGB, resized, and cached on disk as uint8
under a key of its file list and the image size; a bad file is skipped with one warning.

The cache is one folder per dataset holding one `.npy` file per split, written chunk by chunk as
images are decoded and read memory-mapped (`experiments.data.arrays`): a dataset larger than memory
trains, and resident memory does not grow with it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from experiments.core.errors import ExperimentError
from experiments.data.folders import load_cats_vs_dogs_task, load_flowers_task, load_folder_task
from experiments.data.folds import fold_task
from experiments.data.splits import (
    SPLITS,
    Split,
    Task,
    check_fractions,
    check_image_size,
    split_per_class,
    split_seed,
)

log = logging.getLogger(__name__)


def load_task(cfg, paths) -> Task:
    """The task named by `cfg.loader`, downloaded if needed, decoded once and split."""
    from experiments.data.decoding import use_pixel_limit

    size = check_image_size(cfg.image_size)
    use_pixel_limit(cfg.get("max_image_pixels"))
    loader = LOADERS.get(cfg.loader)
    if loader is None:
        raise ExperimentError(
            f"task.loader={cfg.loader!r} is unknown; use one of {sorted(LOADERS)}"
        )
    task = loader(cfg, paths, size)
    if cfg.get("folds") and cfg.get("fold") is not None:
        task = fold_task(task, int(cfg.folds), int(cfg.fold), split_seed(cfg))
    for split in SPLITS:
        if len(task.splits[split].labels) == 0:
            raise ExperimentError(
                f"the {split} split of task {task.name!r} is empty; add images, or change "
                f"task.split / task.per_class so that every split gets some"
            )
    log.info(
        "task %s: %d classes, %s images, %d skipped, %d turned upright (EXIF orientation)",
        task.name,
        task.num_classes,
        "/".join(str(len(task.splits[s].labels)) for s in SPLITS),
        len(task.skipped),
        len(task.turned),
    )
    return task


def load_digits_task(cfg, paths, size) -> Task:
    """scikit-learn's bundled 8x8 digits, upscaled to `size` RGB: the offline task."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    gray = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    images = np.stack(
        [np.asarray(Image.fromarray(g).resize(size[::-1], Image.BILINEAR)) for g in gray]
    )
    images = np.repeat(images[..., None], 3, axis=-1)
    labels = digits.target.astype(np.int32)
    sources = [f"sklearn.datasets.load_digits[{i}]" for i in range(len(labels))]
    index = split_per_class(labels, check_fractions(cfg.split), split_seed(cfg))
    splits = {s: Split(images[i], labels[i], [sources[j] for j in i]) for s, i in index.items()}
    return Task(cfg.name, [str(d) for d in digits.target_names], splits)


LOADERS: dict[str, Callable[..., Task]] = {
    "digits": load_digits_task,
    "flowers": load_flowers_task,
    "cats_vs_dogs": load_cats_vs_dogs_task,
    "folder": load_folder_task,
}
