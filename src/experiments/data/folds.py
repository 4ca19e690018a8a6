"""k-fold cross-validation (`task.folds`, `task.fold`): a fold cut from a task's train and val
images, the test split held out."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from experiments.core.errors import ExperimentError
from experiments.data.folders import class_files
from experiments.data.splits import Split, Task, check_fractions

log = logging.getLogger(__name__)


def fold_task(task: Task, folds: int, fold: int, seed: int) -> Task:
    """Fold `fold` (from 0) of a seeded, stratified `folds`-fold split of the task's train and
    val images: the fold is the val split, the other folds the train split; the test split stays
    held out. The images are rows of the decoded arrays every fold shares."""
    from sklearn.model_selection import StratifiedKFold

    train, val = task.splits["train"], task.splits["val"]
    labels = np.concatenate([train.labels, val.labels])
    smallest = int(np.bincount(labels, minlength=task.num_classes).min())
    if folds > smallest:
        raise ExperimentError(too_many_folds(folds, smallest))
    cut = StratifiedKFold(folds, shuffle=True, random_state=seed)
    rows = dict(zip(("train", "val"), list(cut.split(labels, labels))[fold], strict=True))
    sources = train.sources + val.sources

    def part(chosen: np.ndarray) -> Split:
        images = pooled_rows(train.images, val.images, chosen)
        return Split(images, labels[chosen], [sources[i] for i in chosen])

    splits = {"train": part(rows["train"]), "val": part(rows["val"]), "test": task.splits["test"]}
    return Task(
        task.name, task.class_names, splits, task.skipped, task.turned, base=task, rows=rows
    )


def pooled_rows(first: np.ndarray, second: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Rows `rows` of `first` followed by `second`, read from each (memory-mapped arrays too)
    without joining the two."""
    out = np.empty((len(rows), *first.shape[1:]), first.dtype)
    inside = rows < len(first)
    out[inside] = first[rows[inside]]
    out[~inside] = second[rows[~inside] - len(first)]
    return out


def too_many_folds(folds: int, smallest: int) -> str:
    return (
        f"task.folds={folds} is more than the {smallest} train and val images of the smallest "
        f"class: every fold needs one of each class; use task.folds={max(2, min(smallest, 5))} "
        f"or fewer"
    )


def pool_sizes(cfg) -> list[int] | None:
    """The train + val images per class a task will have, from its listing alone (no decoding);
    None where only the data can tell (a dataset not downloaded yet)."""
    if cfg.loader == "digits":
        from sklearn.datasets import load_digits

        counts = np.bincount(load_digits().target)
    elif cfg.get("per_class"):
        return [int(cfg.per_class[0]) + int(cfg.per_class[1])]
    elif cfg.loader == "folder" and Path(str(cfg.path)).expanduser().is_dir():
        counts = [len(f) for f in class_files(Path(str(cfg.path)).expanduser()).values()]
    else:
        return None
    fractions = check_fractions(cfg.split)
    return [int(n * fractions[0]) + int(n * fractions[1]) for n in counts]
