"""Keras callbacks of our own: per-epoch timing, learning rate and signals. The one that logs
epochs to MLflow is `experiments.tracking.callbacks.TrackEpochs`."""

from __future__ import annotations

import time

import keras

from experiments.core import interrupts


class EpochLogger(keras.callbacks.Callback):
    """Adds `learning_rate`, `epoch_time_s` and `train_images_per_s` to each epoch's logs, and
    keeps the epoch times of each fit it saw (`fits`: how long compiling took, see phases)."""

    def __init__(self, train_size: int):
        super().__init__()
        self.train_size = train_size
        self._start = self._train_end = 0.0
        self.fits: list[list[float]] = []

    def on_train_begin(self, logs=None):
        self.fits.append([])

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()
        self._train_end = 0.0

    def on_test_begin(self, logs=None):
        if self._start and not self._train_end:  # the validation pass that ends a fit epoch
            # Steps are dispatched asynchronously: the last ones may still run on the device.
            # Reading the step count waits for the last step's update, so the time is the
            # device's, not the dispatcher's.
            optimizer = getattr(self.model, "optimizer", None)
            if optimizer is not None:
                keras.ops.convert_to_numpy(optimizer.iterations)
            self._train_end = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        now = time.perf_counter()
        train_seconds = (self._train_end or now) - self._start
        logs["epoch_time_s"] = now - self._start
        if self.fits:
            self.fits[-1].append(logs["epoch_time_s"])
        logs["train_images_per_s"] = self.train_size / max(train_seconds, 1e-9)
        logs["learning_rate"] = float(
            keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)
        )


class StopOnSignal(keras.callbacks.Callback):
    """Raises a SIGTERM or SIGINT that came during `fit` at the next batch boundary.

    Raising, rather than setting `model.stop_training`, keeps Keras from validating and ending
    the partial epoch, which `BackupAndRestore` would then back up as if it were complete. Used
    inside `interrupts.deferred()`; see `experiments.core.interrupts`. It checks as a batch begins:
    a batch-end hook would make Keras wait for every step's logs (no asynchronous dispatch).
    """

    def on_train_batch_begin(self, batch, logs=None):
        interrupts.raise_if_pending()

    def on_test_batch_begin(self, batch, logs=None):
        interrupts.raise_if_pending()
