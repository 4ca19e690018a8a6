"""Keras callbacks of our own: per-epoch timing, learning rate and MLflow metrics."""

from __future__ import annotations

import time

import keras


class EpochLogger(keras.callbacks.Callback):
    """Adds `learning_rate`, `epoch_time_s` and `train_images_per_s` to each epoch's logs and
    logs all of them to the active MLflow run, at step = epoch.

    Not mlflow.keras.MlflowCallback: it logs the optimizer config as params at every fit, which
    MLflow rejects when fine-tuning changes the learning rate, and logs validation metrics twice.
    Fine-tuning passes `initial_epoch`, so its epochs continue the same step count.
    """

    def __init__(self, train_size: int):
        super().__init__()
        self.train_size = train_size
        self._start = self._train_end = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()
        self._train_end = 0.0

    def on_test_begin(self, logs=None):
        if self._start and not self._train_end:  # the validation pass that ends a fit epoch
            self._train_end = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        import mlflow

        logs = logs if logs is not None else {}
        now = time.perf_counter()
        train_seconds = (self._train_end or now) - self._start
        logs["epoch_time_s"] = now - self._start
        logs["train_images_per_s"] = self.train_size / max(train_seconds, 1e-9)
        logs["learning_rate"] = float(
            keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)
        )
        if mlflow.active_run() is not None:
            mlflow.log_metrics({k: float(v) for k, v in logs.items()}, step=epoch)
