"""The Keras callback that logs a run's epochs to MLflow.

This module imports Keras: import it only after the backend is chosen
(`experiments.core.backend`), which is why `experiments.tracking` does not re-export it.
"""

from __future__ import annotations

import keras

from experiments.tracking.runs import log_metrics, log_system_metrics


class TrackEpochs(keras.callbacks.Callback):
    """Logs each epoch's logs to the run, at step = epoch, once the epoch is backed up.

    Not mlflow.keras.MlflowCallback: it logs the optimizer config as params at every fit, which
    MLflow rejects when fine-tuning changes the learning rate, and logs validation metrics twice.
    Fine-tuning passes `initial_epoch`, so its epochs continue the same step count; a resumed run
    continues from its first epoch not backed up, so no step is logged twice.
    """

    def on_epoch_end(self, epoch, logs=None):
        log_metrics({k: float(v) for k, v in (logs or {}).items()}, step=epoch)
        log_system_metrics()
