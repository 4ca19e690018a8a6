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

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from experiments.core.errors import ExperimentError
from experiments.core.files import atomic_dir, read_cache
from experiments.core.progress import progress
from experiments.data.arrays import RowWriter, chunk_rows, copy_rows, open_rows

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


def load_task(cfg, paths) -> Task:
    """The task named by `cfg.loader`, downloaded if needed, decoded once and split."""
    size = check_image_size(cfg.image_size)
    loader = LOADERS.get(cfg.loader)
    if loader is None:
        raise ExperimentError(
            f"task.loader={cfg.loader!r} is unknown; use one of {sorted(LOADERS)}"
        )
    task = loader(cfg, paths, size)
    if cfg.get("folds") and cfg.get("fold") is not None:
        task = fold_task(task, int(cfg.folds), int(cfg.fold), _split_seed(cfg))
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
        counts = [len(f) for f in _class_files(Path(str(cfg.path)).expanduser()).values()]
    else:
        return None
    fractions = check_fractions(cfg.split)
    return [int(n * fractions[0]) + int(n * fractions[1]) for n in counts]


# ---------------------------------------------------------------------------------------------
# Loaders, one per task file in conf/task/.


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
    index = split_per_class(labels, check_fractions(cfg.split), _split_seed(cfg))
    splits = {s: Split(images[i], labels[i], [sources[j] for j in i]) for s, i in index.items()}
    return Task(cfg.name, [str(d) for d in digits.target_names], splits)


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
    files = {s: _class_files(root / s) for s in SPLITS}
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

    return _cached(paths, ("split-folders", str(root.resolve()), _listing(files), size), decode)


LOADERS: dict[str, Callable[..., Task]] = {
    "digits": load_digits_task,
    "flowers": load_flowers_task,
    "cats_vs_dogs": load_cats_vs_dogs_task,
    "folder": load_folder_task,
}


# ---------------------------------------------------------------------------------------------
# Download.


def download_and_extract(cfg, paths) -> Path:
    """The dataset's folder under paths.data_dir, downloading and extracting the archive once."""
    data_dir = Path(paths.data_dir)
    root = data_dir / cfg.folder
    if root.is_dir():
        return root
    archive_name = cfg.url.rsplit("/", 1)[-1]
    try:
        import keras

        data_dir.mkdir(parents=True, exist_ok=True)
        archive = keras.utils.get_file(
            archive_name, cfg.url, cache_dir=str(data_dir), cache_subdir=""
        )
    except Exception as err:  # get_file raises a bare Exception for every network failure
        raise ExperimentError(
            f"the {cfg.name} dataset is missing: {root} does not exist and downloading "
            f"{cfg.url} failed ({_first_line(err)}). Download that archive and extract it into "
            f"{data_dir} so that {root} holds the class folders (or set paths.data_dir)"
        ) from None
    log.info("extracting %s into %s", archive, data_dir)
    shutil.unpack_archive(archive, data_dir)
    if not root.is_dir():
        raise ExperimentError(f"{archive} did not contain {cfg.folder}/; delete it and run again")
    return root


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[-1]


# ---------------------------------------------------------------------------------------------
# Class folders, decoding and splitting.


def _task_from_class_folders(cfg, paths, root: Path, size) -> Task:
    files = _class_files(root)
    class_names = sorted(files)
    _check_classes(root, class_names, files)
    seed = _split_seed(cfg)

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
    return _cached(paths, key, decode)


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


@dataclass
class Notes:
    """What decoding met: files skipped (not decodable, or values out of range) and files turned
    upright by their EXIF orientation."""

    skipped: list[str] = field(default_factory=list)
    turned: list[str] = field(default_factory=list)
    # A fold (task.folds): the task it was cut from, and its train and val rows among that
    # task's train images followed by its val images.
    base: Task | None = None
    rows: dict[str, np.ndarray] | None = None

    def __iadd__(self, other: Notes) -> Notes:
        self.skipped += other.skipped
        self.turned += other.turned
        return self


def decode_files(candidates: list[tuple[Path, int]], size: tuple[int, int]):
    """Decode (path, label) pairs in memory: images, labels, kept paths, notes."""
    chunks = []
    labels, kept, notes = _decode(candidates, size, chunks.append, "decoding")
    images = np.concatenate(chunks) if kept else np.zeros((0, *size, 3), np.uint8)
    return images, labels, kept, notes


def decode_to_file(candidates: list[tuple[Path, int]], size: tuple[int, int], path: Path, name):
    """Decode (path, label) pairs into a `.npy` file at `path`, chunk by chunk: the images
    memory-mapped, labels, kept paths, notes."""
    writer = RowWriter(path, len(candidates), (*size, 3), np.uint8)
    labels, kept, notes = _decode(candidates, size, writer.append, f"decoding {name}")
    return open_rows(path, writer.close()), labels, kept, notes


def _decode(candidates, size, write: Callable[[np.ndarray], None], what: str):
    """Decode in parallel chunks, passing each chunk's images to `write`: labels, kept, notes."""
    labels, kept, notes = [], [], Notes()
    step = min(chunk_rows((*size, 3), np.uint8), 1024)
    with (
        ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool,
        progress(what, len(candidates)) as advance,
    ):
        for start in range(0, len(candidates), step):
            chunk = candidates[start : start + step]
            decoded = list(pool.map(lambda c: decode_image(c[0], size), chunk))
            good = [d.image for d in decoded if d is not None]
            if good:
                write(np.stack(good))
            for (path, label), d in zip(chunk, decoded, strict=True):
                if d is None:
                    notes.skipped.append(str(path))
                    continue
                labels.append(label)
                kept.append(path)
                if d.turned:
                    notes.turned.append(str(path))
            advance(len(chunk))
    return np.array(labels, dtype=np.int32), kept, notes


@dataclass
class Decoded:
    image: np.ndarray  # (h, w, 3) uint8
    turned: bool  # turned upright by its EXIF orientation


class OutOfRange(ValueError):
    """An image whose values cannot be mapped to 0-255 without guessing."""


def decode_image(path: Path, size: tuple[int, int]) -> Decoded | None:
    """The image as the camera meant it, RGB uint8 of `size` (h, w); None with one warning if the
    file is not a decodable image or its values are out of range.

    Its EXIF orientation is applied (Pillow does not by itself), and 16-bit, 32-bit and float
    images are scaled into 0-255 (converting them to RGB would clip them).
    """
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            orientation = image.getexif().get(EXIF_ORIENTATION, 1)
            # Decoding fully here makes truncated files fail now, not mid-epoch.
            upright = ImageOps.exif_transpose(image)
            rgb = as_rgb(upright).resize((size[1], size[0]), Image.BILINEAR)
            return Decoded(np.asarray(rgb, dtype=np.uint8), orientation not in (None, 1))
    except OutOfRange as err:
        log.warning("skipping %s: %s; save it as 8-bit or 16-bit instead", path, err)
        return None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        log.warning("skipping %s: not a decodable image (%s)", path, _first_line(err))
        return None


EXIF_ORIENTATION = 0x0112
# Integer modes hold 16-bit samples (PNG, TIFF): 0-65535 maps to 0-255.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def as_rgb(image):
    """An RGB Pillow image of `image`: grayscale, palette (transparency too), RGBA, LA and CMYK
    as Pillow converts them (alpha dropped, as Keras' and TensorFlow's loaders do); 16-bit and
    32-bit integer samples scaled from 0-65535, float samples from 0-1."""
    from PIL import Image

    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise OutOfRange(
                f"its 32-bit samples run from {values.min():.0f} to {values.max():.0f}, "
                f"outside 0-65535"
            )
        gray = np.round(values / 257.0).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if values.size and not (
            np.isfinite(values).all() and 0 <= values.min() <= values.max() <= 1
        ):
            raise OutOfRange(
                f"its float samples run from {np.nanmin(values):.4g} to {np.nanmax(values):.4g}, "
                f"outside 0-1"
            )
        return Image.fromarray(np.round(values * 255).astype(np.uint8)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # Pillow warns when converting such a palette straight
    return image.convert("RGB")


def _class_files(root: Path) -> dict[str, list[Path]]:
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


# How images are decoded: a change makes earlier caches stale (2: EXIF orientation applied, 16-bit
# and float images scaled instead of clipped).
DECODING = 2


def _cached(paths, key, decode: Callable[[Path], Task]) -> Task:
    """The decoded task from paths.cache_dir/images/<key digest>/, decoding it on a miss.

    `decode(folder)` may write a split's images straight into `folder/<split>.npy` (a dataset
    larger than memory) or return them in memory; either way the task returned reads them
    memory-mapped from the cache.
    """
    versioned = [DECODING, key]
    digest = hashlib.sha256(json.dumps(versioned, default=str).encode()).hexdigest()[:20]
    path = Path(paths.cache_dir) / "images" / digest
    cached = read_cache(path, _read_task)
    if cached is not None:
        log.info("decoded images reused from %s", path)
        return cached
    with atomic_dir(path) as folder:  # a concurrent job never reads half a cache
        task = decode(folder)
        meta = {
            "name": task.name,
            "class_names": task.class_names,
            "skipped": task.skipped,
            "turned": task.turned,
            "sources": {s: task.splits[s].sources for s in SPLITS},
        }
        for s in SPLITS:
            if not (folder / f"{s}.npy").exists():
                np.save(folder / f"{s}.npy", task.splits[s].images)
            np.save(folder / f"{s}_labels.npy", task.splits[s].labels)
        del task  # the maps into `folder`, which is about to move
        (folder / "meta.json").write_text(json.dumps(meta))
    return _read_task(path)


def _read_task(path: Path) -> Task:
    meta = json.loads((path / "meta.json").read_text())
    splits = {}
    for s in SPLITS:
        labels = np.load(path / f"{s}_labels.npy", allow_pickle=False)
        splits[s] = Split(open_rows(path / f"{s}.npy", len(labels)), labels, meta["sources"][s])
    return Task(meta["name"], meta["class_names"], splits, meta["skipped"], meta.get("turned", []))


def _relative(path: Path, root: Path) -> str:
    return Path(path).relative_to(root).as_posix()


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


def _split_seed(cfg) -> int:
    return int(cfg.split_seed)
