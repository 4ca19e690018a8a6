"""Tasks read from class folders: a user's folder (`task=folder`), split per class or already
split into train/, val/ and test/, and the downloaded datasets (flowers, cats_vs_dogs)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from experiments.core.errors import ExperimentError
from experiments.data.arrays import copy_rows, open_rows
from experiments.data.cache import cached_task
from experiments.data.decoding import Notes, decode_files, decode_to_file
from experiments.data.downloads import download_and_extract
from experiments.data.splits import (
    SPLITS,
    Split,
    Task,
    check_fractions,
    split_per_class,
    split_seed,
)

log = logging.getLogger(__name__)


def load_flowers_task(cfg, paths, size) -> Task:
    """TensorFlow's flower_photos: 5 class folders, split per class by `task.split`."""
    root = download_and_extract(cfg, paths)
    return _task_from_class_folders(cfg, paths, root, size)


def load_cats_vs_dogs_task(cfg, paths, size) -> Task:
    """The Microsoft cats-and-dogs archive, sampled per class by `task.per_class`."""
    root = download_and_extract(cfg, paths)
    return _task_from_class_folders(cfg, paths, root, size)


def load_folder_task(cfg, paths, size) -> Task:
    """A user directory: class subfolders, or train/, val/ and test/ each holding them."""
    root = Path(str(cfg.path)).expanduser()
    if not root.is_dir():
        raise ExperimentError(
            f"task.path={cfg.path} is not a directory; point it at a folder with one subfolder "
            f"per class, or with train/, val/ and test/ folders that each hold class subfolders"
        )
    present = [s for s in SPLITS if (root / s).is_dir()]
    if not present:
        return _task_from_class_folders(cfg, paths, root, size)
    if len(present) < len(SPLITS):
        missing = sorted(set(SPLITS) - set(present))
        raise ExperimentError(
            f"task.path={root} has {'/, '.join(present)}/ but no {'/, '.join(missing)}/; "
            f"provide all of train/, val/ and test/, or use plain class folders and task.split"
        )
    files = {s: class_files(root / s) for s in SPLITS}
    class_names = sorted(files["train"])
    for s in SPLITS:
        if sorted(files[s]) != class_names:
            raise ExperimentError(
                f"{root / s} has classes {sorted(files[s])} but {root / 'train'} has "
                f"{class_names}; every split needs the same class folders"
            )
    _check_classes(root, class_names, files["train"])

    def decode(folder: Path) -> Task:
        splits, notes = {}, Notes()
        for s in SPLITS:
            candidates = [(p, class_names.index(c)) for c in class_names for p in files[s][c]]
            images, labels, kept, met = decode_to_file(candidates, size, folder / f"{s}.npy", s)
            splits[s] = Split(images, labels, [_relative(p, root) for p in kept])
            notes += met
        return Task(cfg.name, class_names, splits, notes.skipped, notes.turned)

    return cached_task(paths, ("split-folders", str(root.resolve()), _listing(files), size), decode)


def _task_from_class_folders(cfg, paths, root: Path, size) -> Task:
    files = class_files(root)
    class_names = sorted(files)
    _check_classes(root, class_names, files)
    seed = split_seed(cfg)

    def decode(folder: Path) -> Task:
        if cfg.get("per_class"):
            return _sampled_task(cfg, root, files, class_names, size, seed)
        candidates = [(p, class_names.index(c)) for c in class_names for p in files[c]]
        everything = folder / "all.npy"
        images, labels, kept, notes = decode_to_file(candidates, size, everything, "images")
        index = split_per_class(labels, check_fractions(cfg.split), seed)
        splits = {}
        for s, i in index.items():
            copy_rows(images, i, folder / f"{s}.npy")
            sources = [_relative(kept[j], root) for j in i]
            splits[s] = Split(open_rows(folder / f"{s}.npy", len(i)), labels[i], sources)
        del images
        everything.unlink()
        return Task(cfg.name, class_names, splits, notes.skipped, notes.turned)

    key = (
        "class-folders",
        str(root.resolve()),
        _listing({"all": files}),
        size,
        list(cfg.split or []),
        list(cfg.get("per_class") or []),
        seed,
    )
    return cached_task(paths, key, decode)


def _sampled_task(cfg, root, files, class_names, size, seed) -> Task:
    """A seeded sample of `per_class` decodable images of each class (train, val, test)."""
    quotas = [int(n) for n in cfg.per_class]
    if len(quotas) != 3 or min(quotas) < 1:
        raise ExperimentError(f"task.per_class={list(cfg.per_class)} must be three positive counts")
    rng = np.random.default_rng(seed)
    parts = {s: ([], [], []) for s in SPLITS}
    notes = Notes()
    for label, name in enumerate(class_names):
        order = [files[name][i] for i in rng.permutation(len(files[name]))]
        images, kept, start = [], [], 0
        # Decode in order until the quota is met, so undecodable files are replaced by the next.
        while len(kept) < sum(quotas) and start < len(order):
            chunk = order[start : start + sum(quotas) - len(kept)]
            start += len(chunk)
            imgs, _, ok, met = decode_files([(p, label) for p in chunk], size)
            images.append(imgs)
            kept += ok
            notes += met
        if len(kept) < sum(quotas):
            raise ExperimentError(
                f"class {name!r} in {root} has {len(kept)} decodable images but task.per_class "
                f"needs {sum(quotas)}; lower task.per_class"
            )
        images = np.concatenate(images)
        bounds = np.cumsum([0] + quotas)
        for s, lo, hi in zip(SPLITS, bounds[:-1], bounds[1:], strict=True):
            parts[s][0].append(images[lo:hi])
            parts[s][1].append(np.full(hi - lo, label, np.int32))
            parts[s][2].extend(_relative(p, root) for p in kept[lo:hi])
    splits = {
        s: Split(np.concatenate(i), np.concatenate(y), src) for s, (i, y, src) in parts.items()
    }
    return Task(cfg.name, class_names, splits, notes.skipped, notes.turned)


def class_files(root: Path) -> dict[str, list[Path]]:
    if not root.is_dir():
        raise ExperimentError(f"{root} is not a directory of class folders")
    return {
        d.name: sorted(
            (f for f in d.rglob("*") if f.is_file() and not f.name.startswith(".")),
            key=_natural_key,
        )
        for d in sorted(root.iterdir())
        if d.is_dir() and not d.name.startswith(".")
    }


def _check_classes(root: Path, class_names: list[str], files: dict[str, list[Path]]) -> None:
    if len(class_names) < 2:
        found = f"only {class_names[0]!r}" if class_names else "none"
        raise ExperimentError(
            f"{root} needs at least 2 class subfolders, found {found}; put each class's images "
            f"in its own subfolder"
        )
    for name in class_names:
        if not files[name]:
            raise ExperimentError(f"class folder {root / name} is empty; add images or remove it")


def _natural_key(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def _listing(files: dict) -> list:
    """Names, sizes and modification times: a change to any file changes the cache key."""
    out = []
    for group in sorted(files):
        for name in sorted(files[group]):
            for p in files[group][name]:
                st = p.stat()
                out.append((group, name, p.name, st.st_size, int(st.st_mtime)))
    return out


def _relative(path: Path, root: Path) -> str:
    return Path(path).relative_to(root).as_posix()
