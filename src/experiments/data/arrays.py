"""Arrays larger than memory: `.npy` files written in chunks and read memory-mapped.

Decoded images and extracted features are stored one `.npy` file per split and opened with
`np.load(mmap_mode="r")`, so a batch reads only its own rows from disk. Pages of a mapping that
were read once still count towards the process's resident memory until the kernel needs them
back, and the kernel does not hurry: without help, a pass over a 15 GB split would show as 15 GB
resident. `release` hands them back (`madvise(MADV_DONTNEED)`; the data stays in the page cache
and on disk), so peak resident memory stays flat as a dataset grows.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np

# Rows written or read at once when a whole split is streamed: a few MB of images.
CHUNK_BYTES = 32 * 2**20


def release(array) -> None:
    """Give back the resident pages of a memory-mapped array; a no-op for an in-memory one."""
    mapping = getattr(array, "_mmap", None)  # numpy.memmap's own mmap object, None for a copy
    if mapping is not None and not mapping.closed and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


def chunk_rows(row_shape, dtype) -> int:
    """How many rows of `row_shape` make about CHUNK_BYTES."""
    row_bytes = int(np.prod(row_shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return max(1, CHUNK_BYTES // max(row_bytes, 1))


class RowWriter:
    """Rows appended in chunks to a `.npy` file of up to `capacity` rows, never all in memory.

    Rows left unwritten (images that failed to decode) stay zeros at the end of the file; the
    reader takes the first `count` rows (`open_rows`).
    """

    def __init__(self, path: Path, capacity: int, row_shape, dtype):
        self.path = Path(path)
        self.count = 0
        self._array = np.lib.format.open_memmap(
            self.path, mode="w+", dtype=dtype, shape=(max(int(capacity), 1), *row_shape)
        )

    def append(self, rows) -> None:
        rows = np.asarray(rows)
        self._array[self.count : self.count + len(rows)] = rows
        self.count += len(rows)
        self._array.flush()
        release(self._array)

    def close(self) -> int:
        """Flush and unmap the file; the number of rows written."""
        self._array.flush()
        del self._array
        return self.count


def copy_rows(source, index: np.ndarray, path: Path) -> None:
    """The rows `index` (ascending) of `source` written to a `.npy` file at `path`."""
    writer = RowWriter(path, len(index), source.shape[1:], source.dtype)
    step = chunk_rows(source.shape[1:], source.dtype)
    for start in range(0, len(index), step):
        writer.append(source[index[start : start + step]])
        release(source)
    writer.close()


def open_rows(path: Path, count: int | None = None):
    """The first `count` rows (all when None) of the `.npy` file at `path`, memory-mapped.

    A truncated or overwritten file raises ValueError.
    """
    array = np.load(path, mmap_mode="r")
    if count is None:
        return array
    if array.ndim == 0 or len(array) < count:
        raise ValueError(f"{path} holds {len(array) if array.ndim else 0} rows, not {count}")
    return array[:count]
