"""The input pipeline: uint8 batches of every row once per epoch, reshuffled each epoch."""

from __future__ import annotations

import numpy as np


def test_batches_cover_every_row_once_as_uint8_and_reshuffle_each_epoch(tmp_path):
    from experiments.inputs import batches

    x = np.arange(50, dtype=np.uint8).reshape(50, 1, 1, 1).repeat(4, axis=1)
    y = np.arange(50)
    data = batches(x, y, batch_size=8, shuffle=True, seed=3)
    assert len(data) == 7  # the last batch holds the remaining 2 rows

    def epoch():
        parts = [data[i] for i in range(len(data))]
        assert all(images.dtype == np.uint8 for images, _ in parts)  # cast on the device
        assert all((images[:, 0, 0, 0] == labels).all() for images, labels in parts)
        assert all((np.diff(labels) > 0).all() for _, labels in parts)  # ascending reads
        return np.concatenate([labels for _, labels in parts])

    first = epoch()
    data.on_epoch_end()
    second = epoch()
    assert sorted(first) == sorted(second) == list(range(50))
    assert not np.array_equal(first, second)
    in_order = batches(x, y, batch_size=8)
    assert np.array_equal(np.concatenate([in_order[i][1] for i in range(7)]), y)
    # Threads only where reading a batch waits on the disk.
    assert in_order.workers == 1
    mapped = np.lib.format.open_memmap(tmp_path / "x.npy", "w+", np.uint8, x.shape)
    assert batches(mapped, y, batch_size=8).workers == 2
