"""The image cache: a task decoded once into `paths.cache_dir/images/<key digest>/`, one `.npy`
file per split, read back memory-mapped."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from experiments.core.files import atomic_dir, read_cache
from experiments.data.arrays import open_rows
from experiments.data.splits import SPLITS, Split, Task

log = logging.getLogger(__name__)


# How images are decoded: a change makes earlier caches stale (2: EXIF orientation applied, 16-bit
# and float images scaled instead of clipped; 3: JPEGs decoded at a reduced scale, and a pixel
# limit).
DECODING = 3


def cached_task(paths, key, decode: Callable[[Path], Task]) -> Task:
    """The decoded task from paths.cache_dir/images/<key digest>/, decoding it on a miss.

    `decode(folder)` may write a split's images straight into `folder/<split>.npy` (a dataset
    larger than memory) or return them in memory; either way the task returned reads them
    memory-mapped from the cache.
    """
    from experiments.data.decoding import pixel_limit

    versioned = [DECODING, pixel_limit(), key]  # a raised limit decodes what was skipped
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
