"""The splits of a task: train, val and test images with their labels and sources; the
seeded, stratified split per class; and the checks of `task.image_size` and `task.split`."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from experiments.core.errors import ExperimentError

log = logging.getLogger(__name__)


SPLITS = ("train", "val", "test")


@dataclass
class Split:
    """One split: uint8 images (n, h, w, 3; in memory or memory-mapped), integer labels, and
    where each image came from."""

    images: np.ndarray
    labels: np.ndarray
    sources: list[str]

    def digest(self) -> str:
        """A digest of this split's file list and labels."""
        payload = json.dumps([self.sources, self.labels.tolist()]).encode()
        return hashlib.sha256(payload).hexdigest()[:16]


@dataclass
class Task:
    """A dataset ready for training: class names, three splits, the files that were skipped and
    those turned upright by their EXIF orientation."""

    name: str
    class_names: list[str]
    splits: dict[str, Split]
    skipped: list[str] = field(default_factory=list)
    turned: list[str] = field(default_factory=list)
    # A fold (task.folds): the task it was cut from, and its train and val rows among that
    # task's train images followed by its val images.
    base: Task | None = None
    rows: dict[str, np.ndarray] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def binary(self) -> bool:
        return self.num_classes == 2

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.splits["train"].images.shape[1:])

    def digest(self) -> str:
        """A digest of every split's file list and labels, and of the image size."""
        parts = [self.splits[s].digest() for s in SPLITS] + [str(self.image_shape)]
        return hashlib.sha256("/".join(parts).encode()).hexdigest()[:16]

    def counts(self) -> dict[str, dict[str, int]]:
        """The number of images per split and class."""
        return {
            s: {c: int((self.splits[s].labels == i).sum()) for i, c in enumerate(self.class_names)}
            for s in SPLITS
        }


def split_per_class(labels: np.ndarray, fractions: Sequence[float], seed: int) -> dict:
    """Seeded, stratified indices per split: floor(f0*n) train and floor(f1*n) val per class.

    Written out rather than taken from sklearn's train_test_split: rounding per class reproduces
    the reference's split counts exactly (daisy 501 -> 250/125/126).
    """
    rng = np.random.default_rng(seed)
    out = {s: [] for s in SPLITS}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_train, n_val = int(len(idx) * fractions[0]), int(len(idx) * fractions[1])
        out["train"].append(idx[:n_train])
        out["val"].append(idx[n_train : n_train + n_val])
        out["test"].append(idx[n_train + n_val :])
    return {s: np.sort(np.concatenate(v)).astype(np.int64) for s, v in out.items()}


def check_image_size(value) -> tuple[int, int]:
    """`task.image_size` as (height, width), refused unless it is two sizes of 8 or more."""
    try:
        size = [int(v) for v in value]
    except (TypeError, ValueError):
        size = []
    if len(size) != 2 or min(size) < 8:
        raise ExperimentError(
            f"task.image_size={value} must be [height, width] of at least 8 pixels, e.g. [180,180]"
        )
    return size[0], size[1]


def check_fractions(value) -> list[float]:
    """`task.split` as three positive fractions summing to 1, or refused."""
    try:
        fractions = [float(v) for v in (value or [])]
    except (TypeError, ValueError):
        fractions = []
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ExperimentError(
            f"task.split={value} must be three positive fractions (train, val, test) that sum to "
            f"1, e.g. [0.5,0.25,0.25]"
        )
    return fractions


def split_seed(cfg) -> int:
    return int(cfg.split_seed)
