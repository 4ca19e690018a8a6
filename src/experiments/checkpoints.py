"""Resumable training state of one run: its identity, epoch backups, best weights and history.

A run's state lives in `paths.checkpoint_dir/<mlflow run id>/` until the run ends FINISHED:

- `backup/<phase>/`: Keras' `BackupAndRestore` (weights with the optimizer's state, and the next
  epoch), written atomically at every epoch end; its metadata file also holds every completed
  epoch's logs, so a resumed run returns whole curves, and it is written last, as the one commit
  point of an epoch;
- `best.weights.h5`: the best `trainer.monitor` epoch so far, across phases;
- `<phase>.done.weights.h5`: the weights a finished phase handed on (fine-tune resumes in its
  second phase without repeating the first).

A reader never trusts a file it did not see complete: everything is written to a temporary name
in the same folder and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from omegaconf import OmegaConf

from experiments.files import atomic_path, write_json

# Where a run writes, and how it is resumed, are not what the run is.
NOT_IDENTITY = ("paths", "hydra", "tracking", "resume")


def run_identity(cfg) -> str:
    """A digest of the resolved config minus where it writes: equal configs, equal runs."""
    container = OmegaConf.to_container(cfg, resolve=True)
    for key in NOT_IDENTITY:
        container.pop(key, None)
    text = json.dumps(container, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class RunCheckpoints:
    """The resumable state of one run, in `root`."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.best_path = self.root / "best.weights.h5"

    def records(self) -> list[dict]:
        """Every committed epoch's logs, oldest first (the latest phase's backup holds them all)."""
        latest: list[dict] = []
        for path in self.root.glob("backup/*/training_metadata.json"):
            try:
                history = json.loads(path.read_text()).get("history", [])
            except (OSError, ValueError):
                continue
            if len(history) > len(latest):
                latest = history
        return latest

    def history(self, start: int = 0, end: int | None = None) -> dict[str, list[float]]:
        """Keras-style history of the epochs in [start, end)."""
        out: dict[str, list[float]] = {}
        for record in self.records():
            if record["epoch"] >= start and (end is None or record["epoch"] < end):
                for key, value in record.items():
                    if key != "epoch":
                        out.setdefault(key, []).append(value)
        return out

    def completed_epochs(self) -> int:
        return len(self.records())

    def best_so_far(self, monitor: str) -> float | None:
        values = [r[monitor] for r in self.records() if monitor in r]
        if not values:
            return None
        return min(values) if "loss" in monitor else max(values)

    def done_path(self, phase: str) -> Path:
        return self.root / f"{phase}.done.weights.h5"

    def phase_done(self, phase: str) -> bool:
        return self.done_path(phase).is_file()

    def mark_phase_done(self, phase: str, model) -> None:
        with atomic_path(self.done_path(phase), ".weights.h5") as tmp:
            model.save_weights(tmp)

    def backup(self, phase: str, initial_epoch: int):
        return _backup_class()(self, self.root / "backup" / phase, initial_epoch)

    def best_checkpoint(self, monitor: str):
        return _best_class()(self, monitor)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _backup_class():
    import keras

    class Backup(keras.callbacks.BackupAndRestore):
        """Keras' BackupAndRestore with atomic files, the epoch history, and a clean restart.

        Keras writes `latest.weights.h5` in place (a kill mid-write leaves a file that cannot be
        loaded) and never resets `model._initial_epoch`, so a second `fit` of the same model
        (fine-tune's second phase) would start at the first phase's restored epoch.
        The metadata file is written last, with the epoch's logs: it is the commit point.
        """

        # It saves per epoch only (its batch hook does nothing then), so Keras may dispatch the
        # batch hooks asynchronously: a callback that is not async-safe makes every training
        # step wait for the device to hand its logs back.
        async_safe = True

        def __init__(self, state: RunCheckpoints, backup_dir: Path, initial_epoch: int):
            super().__init__(str(backup_dir), save_freq="epoch", delete_checkpoint=False)
            self.state = state
            self.initial_epoch = initial_epoch
            self._records: list[dict] = []

        def on_train_begin(self, logs=None):
            self.model._initial_epoch = None
            super().on_train_begin(logs)
            resumed_at = self.model._initial_epoch or self.initial_epoch
            # Epochs after the last committed backup are redone, so their logs are dropped.
            self._records = [r for r in self.state.records() if r["epoch"] < resumed_at]

        def on_epoch_end(self, epoch, logs=None):
            record = {"epoch": int(epoch)}
            record |= {k: float(v) for k, v in (logs or {}).items()}
            self._records.append(record)
            super().on_epoch_end(epoch, logs)

        def on_train_end(self, logs=None):
            self.model._initial_epoch = None
            super().on_train_end(logs)

        def _save_model(self):
            with atomic_path(Path(self._weights_path), ".weights.h5") as tmp:
                self.model.save_weights(tmp, overwrite=True)
            # Keras reads "epoch"; the history rides in the same file, committed with it.
            metadata = {"epoch": self._current_epoch, "history": self._records}
            write_json(Path(self._training_metadata_path), metadata)

    return Backup


def _best_class():
    import keras

    class BestCheckpoint(keras.callbacks.ModelCheckpoint):
        """The best `monitor` epoch's weights, written atomically, remembering earlier epochs.

        After a resume Keras' ModelCheckpoint would start from -inf and overwrite the best file
        with the first resumed epoch; it starts from the history's best instead.
        """

        async_safe = True  # per epoch only, as Backup above

        def __init__(self, state: RunCheckpoints, monitor: str):
            best = state.best_so_far(monitor)
            super().__init__(
                str(state.best_path),
                monitor=monitor,
                save_best_only=True,
                save_weights_only=True,
                initial_value_threshold=best,
            )
            self.state = state

        def _save_model(self, epoch, batch, logs):
            if self._should_save_model(epoch, batch, logs, self.filepath):
                with atomic_path(Path(self.filepath), ".weights.h5") as tmp:
                    self.model.save_weights(tmp, overwrite=True)

    return BestCheckpoint
