"""The input pipeline: batches of a split read from host arrays, on every Keras backend.

Images stay uint8 from disk to the device: a batch is sliced from the split's uint8 array (in
memory or memory-mapped) and the model casts it to float on the device, four times fewer bytes
than float32 to carry, and no float copy of a dataset ever exists on the host. Keras'
`PyDataset` is the one input type that every backend consumes natively (TensorFlow wraps it in
`tf.data` and prefetches, JAX and PyTorch iterate it, JAX sending the next batch to a GPU
ahead); for a memory-mapped split larger than the page cache can keep, its worker threads read
the next batches from the disk while the device computes. `tf.data` would tie the JAX path to
TensorFlow.

This module imports Keras: import it only after the backend is chosen (`experiments.core.backend`).
"""

from __future__ import annotations

import functools
import logging
import math

import keras
import numpy as np

from experiments.data.arrays import release

log = logging.getLogger(__name__)

# Threads that read the next batches of a split whose reads wait on the disk, and how many
# batches they keep ready. A split the page cache can hold needs none, memory-mapped or not: a
# batch is one memory copy, and Keras' enqueuer costs 0.1 s each time it stops (its queue is
# drained with a 0.1 s timeout), twice an epoch with a validation split and once per `predict`:
# 1.7 s of 10 epochs measured here, whatever the model. Without threads, TensorFlow prefetches
# through tf.data and JAX sends the next batch to the GPU ahead.
WORKERS = 2
QUEUE = 8
# A memory-mapped split larger than this share of the memory available (divided among the
# sweep's jobs that run on this machine, which each see the same free memory) is read from the
# disk. Nothing is read into the process's own memory: a split that fits stays in the page cache.
CACHED_SHARE = 0.5


# `trainer.data_on_device=auto` keeps a split that trains on a JAX accelerator there when it takes
# at most this share of the device's free memory: each batch is then gathered on the device,
# where the host would otherwise slice it and copy it over, one batch at a time, in the thread
# that dispatches the train steps (measured on an H200: light backbones trained at 7,000-9,000
# images/s whatever their floor, MobileNetV2 at 0.28 of it).
DEVICE_SHARE = 0.25


def reads_wait_on_disk(x) -> bool:
    """Whether reading batches of `x` waits on the disk: a memory-mapped array too large for the
    page cache to keep (an array in memory, or a mapped one that fits, is read from memory)."""
    if not isinstance(x, np.memmap):
        return False
    import psutil

    from experiments.core.devices import jobs_sharing_host

    return x.nbytes > CACHED_SHARE / jobs_sharing_host() * psutil.virtual_memory().available


def on_device(setting, x, what: str) -> bool:
    """Whether `trainer.data_on_device=setting` keeps the split `x` on the accelerator while it
    trains. `auto`: on JAX with a GPU or TPU, when `x` takes at most DEVICE_SHARE of the
    device's free memory (divided among the sweep's jobs that share the device) and its reads
    do not wait on the disk; `true`: on any JAX device (the CPU included); `false`: never.
    Only JAX consumes batches that are already on a device (`validate_config` refuses `true`
    on another backend)."""
    text = str(setting).lower()
    if text == "false" or keras.backend.backend() != "jax":
        return False
    import jax

    device = jax.config.jax_default_device
    if not hasattr(device, "memory_stats"):  # unset, or a platform's name
        device = jax.devices()[0]
    if text == "auto":
        from experiments.core.devices import jobs_sharing_device

        stats = device.memory_stats() if device.platform != "cpu" else None
        if not stats or reads_wait_on_disk(x):
            return False
        # A job sees its own use only, not that of the sweep's other jobs on the same GPU
        free = stats.get("bytes_limit", 0) - stats.get("bytes_in_use", 0)
        share = DEVICE_SHARE / jobs_sharing_device()
        if x.nbytes > share * free:
            log.info(
                "%s: %.1f MB stay on the host (more than %.1f%% of %s's %.0f MB free)",
                what, x.nbytes / 2**20, 100 * share, device, free / 2**20,
            )  # fmt: skip
            return False
    log.info("%s: %.1f MB kept on %s, batches gathered there", what, x.nbytes / 2**20, device)
    return True


def devices_per_batch() -> int:
    """How many devices each batch is split across: the batch axis of Keras' data-parallel
    distribution (`trainer.devices`), else 1. JAX shards only a batch they divide (an uneven
    one raises its IndivisibleError, keras#21167), so every batch is a multiple of it."""
    current = keras.distribution.distribution()
    if current is None:
        return 1
    mesh = current.device_mesh
    return int(mesh.shape[list(mesh.axis_names).index(current.batch_dim_name)])


class Batches(keras.utils.PyDataset):
    """`(x[i:j], y[i:j])` batches of arrays `x` and `y`, reshuffled every epoch when `shuffle`;
    with `pad`, the last batch is filled up to `batch_size` with rows of zeros. With `device`
    (JAX), `x` is copied to the default device once and each batch's inputs are gathered there,
    in one compiled call; the labels, a few bytes a batch, stay on the host.

    Split across `devices` (`devices_per_batch`), every batch is a multiple of them: a training
    batch (`shuffle`) by leaving out the last rows of the epoch's order that do not fill one
    (fewer than `devices`; the next epoch's order leaves out others); a validation batch by
    rows of zeros that weigh nothing, each batch then `(x, y, sample_weight)`. The quickstart's
    445 validation images (the last batch of 29 filled up to 30) gave every epoch's val_loss
    and val_accuracy on 2 devices equal to 1 device's to 5 decimals (tests/test_distribution).

    Each batch reads its rows in ascending order, which a memory-mapped array serves with
    sequential reads; the order of the rows inside a batch does not matter to training.
    """

    def __init__(
        self,
        x,
        y,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        pad: bool = False,
        device: bool = False,
        devices: int = 1,
    ):
        threads = WORKERS if reads_wait_on_disk(x) and not device else 1
        super().__init__(workers=threads, use_multiprocessing=False, max_queue_size=QUEUE)
        if len(x) != len(y):
            raise ValueError(f"{len(x)} inputs but {len(y)} labels")
        self.x, self.y = x, np.asarray(y)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.pad = pad
        self.devices = int(devices)
        # Training rows an epoch uses: all but a last batch's remainder the devices cannot split.
        self._used = len(self.y)
        if shuffle:
            self._used -= (len(self.y) % self.batch_size) % self.devices
        self._weighed = self.devices > 1 and not shuffle and not pad
        self._rng = np.random.default_rng(seed)
        self._order = self._rng.permutation(len(self.y)) if shuffle else None
        self._resident = None
        if device:
            import jax

            self._resident = jax.device_put(x)
            release(self.x)

    def __len__(self) -> int:
        return math.ceil(self._used / self.batch_size)

    def __getitem__(self, index: int):
        start = index * self.batch_size
        stop = min(start + self.batch_size, self._used)
        order = self._order
        rows = slice(start, stop) if order is None else np.sort(order[start:stop])
        if self._resident is not None:
            batch = self._gathered(rows)
        else:
            images = self.x[rows]  # a slice of a mapped array is a view of it: copied
            inputs = np.array(images) if isinstance(rows, slice) else np.asarray(images)
            batch = inputs, self.y[rows]
            release(self.x)  # the rows just read no longer count as this process's memory
            if self.pad and len(batch[1]) < self.batch_size:
                batch = tuple(_filled_up(part, self.batch_size) for part in batch)
        if not self._weighed:
            return batch
        count = stop - start  # the real rows (the gathered labels are filled up already)
        size = math.ceil(count / self.devices) * self.devices
        weights = _filled_up(np.ones(count, np.float32), size)
        if self._resident is None:
            batch = tuple(_filled_up(part, size) for part in batch)
        return (*batch, weights)

    def _gathered(self, rows):
        """The batch of `rows` with its inputs gathered on the device (filled up with zeros
        to `batch_size` when `pad`: an index past the end gathers zeros)."""
        count = len(self.y)
        if isinstance(rows, slice):
            rows = np.arange(rows.start, min(rows.stop, count))
        labels = self.y[rows]
        size = self.batch_size if self.pad else len(rows)
        if self._weighed:
            size = math.ceil(len(rows) / self.devices) * self.devices
        if len(rows) < size:
            rows = np.concatenate([rows, np.full(size - len(rows), count)])
            labels = _filled_up(labels, size)
        return _device_take()(self._resident, rows.astype(np.int32)), labels

    def on_epoch_end(self) -> None:
        if self.shuffle:
            self._order = self._rng.permutation(len(self.y))


@functools.cache
def _device_take():
    """A compiled `x[rows]` on `x`'s device, zeros for a row past the end."""
    import jax

    return jax.jit(lambda x, rows: x.at[rows].get(mode="fill", fill_value=0))


def _filled_up(rows: np.ndarray, count: int) -> np.ndarray:
    """`rows` followed by rows of zeros, `count` rows in all."""
    filler = np.zeros((count - len(rows), *rows.shape[1:]), rows.dtype)
    return np.concatenate([rows, filler])


def batches(
    x,
    y=None,
    *,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    pad: bool = False,
    device: bool = False,
) -> Batches:
    """A `Batches` of `x` and `y` (zeros when only inputs are given, for `predict`)."""
    labels = np.zeros(len(x), np.int32) if y is None else y
    return Batches(x, labels, batch_size, shuffle, seed, pad, device, devices_per_batch())


def even_batch_size(rows: int, batch_size: int) -> int:
    """A batch size that cuts `rows` into batches of one size: `batch_size` if it does, else the
    size that does nearest to it between half and twice it (the larger of two as near), else
    `batch_size`.

    Split across devices (`devices_per_batch`), the size is a multiple of them: `batch_size`
    rounded up to one, and the sizes that divide `rows` only those multiples.

    For the validation split and for predictions: a compiled backend compiles the step once more
    for a last batch of another size, and Keras' validation loss and accuracy are means over the
    images whatever the batches (the loss of each batch is weighted by its size), so they do not
    change.
    """
    devices = devices_per_batch()  # split across devices, a batch is a multiple of them
    batch_size = math.ceil(batch_size / devices) * devices
    if rows <= 0 or rows % batch_size == 0:
        return batch_size
    sizes = [
        n
        for n in range(max(devices, batch_size // 2), 2 * batch_size + 1)
        if rows % n == 0 and n % devices == 0
    ]
    return min(sizes, key=lambda n: (abs(n - batch_size), -n)) if sizes else batch_size
