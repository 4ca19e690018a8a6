"""The numbers a run reports about itself: the reference's comparison columns, the score of the
model it saves, the test accuracy's interval, and the value it returns to a sweeper.

The score a run is chosen by is the score of the model it saves. With `trainer.restore_best`
(the default) the saved weights are the best `trainer.monitor` epoch's; without it, the last
epoch's. `saved_val_accuracy` and `saved_val_loss` are that epoch's, and a per-epoch
`optimized_metric` returns its value at that epoch: never a better epoch whose weights are gone.
`best_val_accuracy` keeps its meaning, the best epoch's, whatever was kept.
"""

from __future__ import annotations

import math

from experiments.core.errors import ExperimentError

# Per-epoch metrics recorded as `saved_<name>`, the saved epoch's.
SAVED = ("val_accuracy", "val_loss")


def saved_epoch(history: dict[str, list[float]], restore_best: bool, monitor: str) -> int:
    """The index of the epoch whose weights the run saves: the first best `monitor` epoch (lowest
    for a loss) when the best is restored, else the last; -1 without any epoch."""
    epochs = len(history.get("loss", []))
    if epochs == 0:
        return -1
    values = history.get(monitor)
    if not restore_best or not values:
        return epochs - 1
    best = min(values) if "loss" in monitor else max(values)
    return values.index(best)


def summary_metrics(cfg, trained, test, train_time: float, task) -> dict:
    """The reference's comparison columns for one run, the saved epoch's validation scores
    (`saved_*`, `saved_epoch` counted from 1) and the Wilson 95% interval of the test accuracy
    on its n images (`test_accuracy_ci95_low`, `_high`)."""
    import numpy as np

    from experiments.evaluation.statistics import wilson_interval

    model = trained.model
    trainable = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    total = int(model.count_params())
    history = trained.history
    kept = saved_epoch(history, bool(cfg.trainer.restore_best), str(cfg.trainer.monitor))
    n = len(test.labels)
    low, high = wilson_interval(int((test.predictions == test.labels).sum()), n)
    metrics = {
        "test_loss": test.loss,
        "test_accuracy": test.accuracy,
        "test_accuracy_ci95_low": low,
        "test_accuracy_ci95_high": high,
        "best_val_accuracy": max(history.get("val_accuracy", [float("nan")])),
        "saved_epoch": kept + 1,
        "final_train_accuracy": history.get("accuracy", [float("nan")])[-1],
        "epochs_run": len(history.get("loss", [])),
        "train_time_s": train_time,
        "total_params": total,
        "trainable_params": trainable,
        "skipped_files": len(task.skipped),
        "turned_files": len(task.turned),  # turned upright by their EXIF orientation
    }
    for name in SAVED:
        values = history.get(name, [])
        metrics[f"saved_{name}"] = float(values[kept]) if 0 <= kept < len(values) else math.nan
    return metrics


def optimized_values(names, history: dict[str, list[float]], metrics: dict):
    """What the job returns to a sweeper: the value of `optimized_metric`, or a tuple of values
    when it names several (a multi-objective study)."""
    if isinstance(names, str):
        return optimized_value(names, history, metrics)
    return tuple(optimized_value(str(name), history, metrics) for name in names)


def returned_text(names, value) -> str:
    if isinstance(names, str):
        return f"{names}={value:.4f}"
    return ", ".join(f"{n}={v:.4f}" for n, v in zip(names, value, strict=True))


def optimized_value(name: str, history: dict[str, list[float]], metrics: dict) -> float:
    """A final metric by name, or a per-epoch one's value at the saved epoch (`saved_epoch`):
    the score of the weights the run keeps, not of its best epoch."""
    if name in metrics:
        return float(metrics[name])
    kept = int(metrics.get("saved_epoch", 0)) - 1
    if name in history and 0 <= kept < len(history[name]):
        return float(history[name][kept])
    raise ExperimentError(
        f"optimized_metric={name!r} is not recorded; use a per-epoch metric "
        f"({', '.join(sorted(history))}; the saved epoch's) or a final one "
        f"({', '.join(sorted(metrics))})"
    )
