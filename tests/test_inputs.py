"""The input pipeline: uint8 batches of every row once per epoch, reshuffled each epoch."""

from __future__ import annotations

import numpy as np
import pytest


def test_batches_cover_every_row_once_as_uint8_and_reshuffle_each_epoch(tmp_path, monkeypatch):
    import psutil

    from experiments.data import inputs
    from experiments.data.inputs import batches

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

    padded = batches(x, y, batch_size=8, pad=True)
    images, labels = padded[6]  # the last 2 rows, then 6 rows of zeros
    assert images.shape == (8, 4, 1, 1) and images.dtype == np.uint8 and labels.shape == (8,)
    assert images[:2, 0, 0, 0].tolist() == labels[:2].tolist() == [48, 49]
    assert not images[2:].any() and not labels[2:].any()
    assert padded[0][0].shape == (8, 4, 1, 1)

    first = epoch()
    data.on_epoch_end()
    second = epoch()
    assert sorted(first) == sorted(second) == list(range(50))
    assert not np.array_equal(first, second)
    in_order = batches(x, y, batch_size=8)
    assert np.array_equal(np.concatenate([in_order[i][1] for i in range(7)]), y)
    # Threads only where reading a batch waits on the disk: each stop of Keras' enqueuer costs
    # 0.1 s, twice an epoch.
    assert in_order.workers == 1
    mapped = np.lib.format.open_memmap(tmp_path / "x.npy", "w+", np.uint8, x.shape)
    assert batches(mapped, y, batch_size=8).workers == 1  # the page cache holds it
    monkeypatch.setattr(inputs, "CACHED_SHARE", 150 / psutil.virtual_memory().available)
    assert batches(mapped[:25], y[:25], batch_size=8).workers == 1  # 100 of 150 bytes: held
    assert batches(mapped, y, batch_size=8).workers == 2  # 200 bytes: from disk


def _resident_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def test_reading_a_mapped_split_keeps_resident_memory_flat(tmp_path, monkeypatch):
    from experiments.data import inputs
    from experiments.data.arrays import RowWriter, open_rows

    rows, shape = 2048, (128, 128, 3)  # 96 MB of images, written and read in batches
    writer = RowWriter(tmp_path / "x.npy", rows, shape, np.uint8)
    before = _resident_mb()
    for start in range(0, rows, 256):
        writer.append(np.full((256, *shape), start // 256, np.uint8))
    assert writer.close() == rows
    assert _resident_mb() - before < 40  # written without keeping the pages
    x = open_rows(tmp_path / "x.npy", rows)
    assert isinstance(x, np.memmap) and x.dtype == np.uint8
    labels = np.repeat(np.arange(8), 256)

    def read_all() -> float:
        data = inputs.batches(x, labels, batch_size=64, shuffle=True, seed=1)
        start = _resident_mb()
        for i in range(len(data)):
            images, y = data[i]
            assert (images[:, 0, 0, 0] == y).all()  # the right rows, in order with their labels
        return _resident_mb() - start

    assert read_all() < 40
    # Without giving the pages back, the same pass keeps the whole file resident: what the
    # check above would miss if the mechanism broke.
    monkeypatch.setattr(inputs, "release", lambda array: None)
    assert read_all() > 80


def test_predict_in_batches_streams_outputs_with_one_log_line(caplog, monkeypatch):
    """...in batches of one shape: the model is compiled once, not again for the last batch."""
    import logging

    import keras

    from experiments.model import forward
    from experiments.model.forward import predict_in_batches

    monkeypatch.setattr(forward, "CHUNK_BATCHES", 2)  # 8 images a chunk

    class BatchSizes(keras.layers.Layer):  # the batch sizes the model is traced with
        seen: set = set()

        def call(self, images):
            self.seen.add(images.shape[0])
            return images

    model = keras.Sequential([keras.Input((2, 2, 3)), BatchSizes(), keras.layers.Flatten()])
    BatchSizes.seen.clear()
    x = np.arange(11 * 12, dtype=np.uint8).reshape(11, 2, 2, 3)
    parts = []
    with caplog.at_level(logging.INFO, logger="experiments.core.progress"):
        predict_in_batches(
            model, x, batch_size=4, what="extracting train features", write=parts.append
        )
    assert [len(p) for p in parts] == [8, 3]
    np.testing.assert_array_equal(np.concatenate(parts), x.reshape(11, 12))
    assert BatchSizes.seen == {4}  # 11 rows: the last 3 went in a batch of 4, filled with zeros
    model = keras.Sequential([keras.Input((2, 2, 3)), BatchSizes(), keras.layers.Flatten()])
    BatchSizes.seen.clear()
    predict_in_batches(model, x[:10], batch_size=4, what="predicting", write=parts.append)
    assert BatchSizes.seen == {5} and len(parts[-1]) == 10  # 10 rows: two batches of 5
    # No terminal under pytest: no bar, one line with the count and the rate.
    (line,) = [r.getMessage() for r in caplog.records if r.name == "experiments.core.progress"]
    assert line.startswith("extracting train features: 11 images in ") and "images/s" in line


def test_validation_batches_of_one_size_score_as_keras_batches_do():
    """The validation split goes in batches of one size where one near the batch size divides
    it (one compiled test step, not two), and Keras' loss and accuracy stay the same."""
    from types import SimpleNamespace

    import keras
    from omegaconf import OmegaConf

    from experiments.data.inputs import batches, even_batch_size
    from experiments.training.strategies import images_dataset

    assert even_batch_size(2000, 16) == 16  # divides already
    assert even_batch_size(1000, 16) == 20  # 62 x 16 + 8 otherwise
    assert even_batch_size(24, 16) == 12  # nearer than 24
    assert even_batch_size(100, 32) == 25
    assert even_batch_size(10, 16) == 10  # one batch
    assert even_batch_size(997, 16) == 16  # a prime: none does

    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (30, 4, 4, 3), dtype=np.uint8)
    y = rng.integers(0, 3, 30)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4, 4, 3)), keras.layers.Rescaling(1 / 255), keras.layers.Flatten()]
        + [keras.layers.Dense(3, activation="softmax")]
    )
    model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    uneven = model.evaluate(batches(x, y, batch_size=16), return_dict=True, verbose=0)
    size = even_batch_size(len(x), 16)
    assert size == 15
    even = model.evaluate(batches(x, y, batch_size=size), return_dict=True, verbose=0)
    assert even["loss"] == pytest.approx(uneven["loss"], rel=1e-6)
    assert even["accuracy"] == uneven["accuracy"]
    # What a run validates on; training keeps the batch size asked.
    split = SimpleNamespace(images=x, labels=y)
    ctx = SimpleNamespace(
        cfg=OmegaConf.create({"trainer": {"batch_size": 16, "seed": 0}}),
        task=SimpleNamespace(splits={"train": split, "val": split}),
    )
    assert images_dataset(ctx, "val").batch_size == 15
    assert images_dataset(ctx, "train").batch_size == 16


def _tiny_classifier():
    import keras

    model = keras.Sequential(
        [keras.Input((4, 4, 3)), keras.layers.Rescaling(1 / 255), keras.layers.Flatten()]
        + [keras.layers.Dense(3, activation="softmax")]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


@pytest.mark.backends
def test_a_split_kept_on_the_device_gives_the_same_batches_and_the_same_training():
    """trainer.data_on_device: the split is copied to the JAX device once and each batch is
    gathered there; the batches, and what Keras trains on them, are those read from the host."""
    import keras

    if keras.backend.backend() != "jax":
        pytest.skip("batches on a device are a JAX path (make test-jax runs this)")
    import jax

    from experiments.data.inputs import batches

    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (45, 4, 4, 3), dtype=np.uint8)
    y = rng.integers(0, 3, 45)
    host = batches(x, y, batch_size=8, shuffle=True, seed=5)
    device = batches(x, y, batch_size=8, shuffle=True, seed=5, device=True)
    for _ in range(2):  # two epochs: the same reshuffle
        for i in range(len(host)):
            (hx, hy), (dx, dy) = host[i], device[i]
            assert isinstance(dx, jax.Array) and dx.dtype == np.uint8
            assert np.array_equal(np.asarray(dx), hx) and np.array_equal(dy, hy)
        host.on_epoch_end()
        device.on_epoch_end()
    assert device[5][0].shape == (5, 4, 4, 3)  # the last 5 rows
    padded = batches(x, y, batch_size=8, pad=True, device=True)
    images, labels = padded[5]
    assert images.shape == (8, 4, 4, 3) and labels.shape == (8,)
    assert np.array_equal(np.asarray(images[:5]), x[40:]) and not np.asarray(images[5:]).any()
    assert labels[:5].tolist() == y[40:].tolist() and not labels[5:].any()

    histories, weights = [], []
    for on_device in (False, True):
        keras.utils.set_random_seed(0)
        model = _tiny_classifier()
        train = batches(x, y, batch_size=8, shuffle=True, seed=1, device=on_device)
        val = batches(x[:15], y[:15], batch_size=5, device=on_device)
        history = model.fit(train, validation_data=val, epochs=3, shuffle=False, verbose=0)
        histories.append(history.history)
        weights.append(model.get_weights())
    assert histories[0] == histories[1]
    assert all(np.array_equal(a, b) for a, b in zip(*weights, strict=True))


@pytest.mark.backends
def test_data_on_device_auto_keeps_a_split_on_an_accelerator_that_has_room(monkeypatch, caplog):
    """auto: on a JAX GPU or TPU when the split takes at most a quarter of its free memory (a
    quarter of each job's part where a sweep's jobs share the GPU); never on a CPU or another
    backend; true on any JAX device; false never. A run's fit gets what the setting says."""
    import logging
    from types import SimpleNamespace

    import keras
    from omegaconf import OmegaConf

    from experiments.core import devices
    from experiments.data import inputs
    from experiments.data.inputs import on_device
    from experiments.training.strategies import images_dataset

    x = np.zeros((100, 4, 4, 3), np.uint8)  # 4,800 bytes
    if keras.backend.backend() != "jax":
        assert not any(on_device(s, x, "training data") for s in ("auto", "true", "false"))
        return
    import jax

    assert not on_device("auto", x, "training data")  # a CPU: the host is the device
    assert on_device("true", x, "training data") and not on_device("false", x, "training data")

    class Accelerator:
        platform = "gpu"
        free = 20_000

        def memory_stats(self):
            return {"bytes_limit": self.free + 1_000, "bytes_in_use": 1_000}

        def __str__(self):
            return "cuda:0"

    monkeypatch.setattr(jax, "devices", lambda *_: [Accelerator()])
    caplog.set_level(logging.INFO, logger="experiments.data.inputs")
    assert on_device("auto", x, "training data")  # 4,800 <= 5,000
    assert "training data: 0.0 MB kept on cuda:0" in caplog.text
    Accelerator.free = 19_000
    assert not on_device("auto", x, "validation data")  # 4,800 > 4,750
    assert "validation data: 0.0 MB stay on the host (more than 25.0% of cuda:0's" in caplog.text
    Accelerator.free = 20_000
    monkeypatch.setattr(devices, "jobs_sharing_device", lambda: 3)  # a sweep's n_jobs on one GPU
    assert not on_device("auto", x, "training data")  # 4,800 > 20,000 / 4 / 3
    assert "more than 8.3% of cuda:0's" in caplog.text
    monkeypatch.setattr(inputs, "reads_wait_on_disk", lambda _: True)
    Accelerator.free = 10**9
    assert not on_device("auto", x, "training data")  # too large for memory: read from disk
    monkeypatch.undo()

    split = SimpleNamespace(images=x, labels=np.zeros(100, int))
    for setting, kind in (("true", jax.Array), ("false", np.ndarray), ("auto", np.ndarray)):
        ctx = SimpleNamespace(
            cfg=OmegaConf.create(
                {"trainer": {"batch_size": 16, "seed": 0, "data_on_device": setting}}
            ),
            task=SimpleNamespace(splits={"train": split, "val": split}),
        )
        for name in ("train", "val"):
            assert isinstance(images_dataset(ctx, name)[0][0], kind), (setting, name)


def test_a_split_fits_the_page_cache_by_each_jobs_share_of_the_memory(monkeypatch, tmp_path):
    """A memory-mapped split is read as from memory when it takes at most half of the memory
    available, divided among the sweep's jobs on this machine (each sees the same free memory)."""
    from types import SimpleNamespace

    import psutil

    from experiments.core.devices import DEVICE_SLOT_ENV
    from experiments.data.arrays import open_rows
    from experiments.data.inputs import reads_wait_on_disk

    np.save(tmp_path / "x.npy", np.zeros((100, 10), np.float32))  # 4,000 bytes
    x = open_rows(tmp_path / "x.npy")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=10_000))
    monkeypatch.delenv(DEVICE_SLOT_ENV, raising=False)
    assert not reads_wait_on_disk(x)  # 4,000 <= 5,000
    monkeypatch.setenv(DEVICE_SLOT_ENV, "1/2")  # one of two jobs: 4,000 > 5,000 / 2
    assert reads_wait_on_disk(x)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=16_000))
    assert not reads_wait_on_disk(x)  # 4,000 <= 16,000 / 2 / 2
    assert not reads_wait_on_disk(np.zeros((100, 10), np.float32))  # in memory already


def test_predicting_in_batches_holds_a_bounded_chunk_of_outputs(monkeypatch):
    """Features go to `write` a chunk at a time, each at most CHUNK_BYTES of outputs, however
    many rows: Keras' predict holds a call's outputs twice, so the chunk bounds the memory."""
    import keras

    from experiments.model import forward

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(20_000)])  # 80 KB a row
    monkeypatch.setattr(forward, "CHUNK_BYTES", 2 * 2**20)  # 26 rows: one batch of 16
    calls, written = [], []
    original = model.predict

    def predict(data, **kwargs):
        calls.append(sum(len(data[i][1]) for i in range(len(data))))
        return original(data, **kwargs)

    monkeypatch.setattr(model, "predict", predict)
    x = np.random.default_rng(0).normal(size=(80, 4)).astype(np.float32)
    forward.predict_in_batches(model, x, batch_size=16, what="features", write=written.append)
    assert calls == [16] * 5  # 2 MB of outputs hold one batch of 16 rows (1.3 MB)
    assert np.allclose(np.concatenate(written), original(x, verbose=0), atol=1e-5)
