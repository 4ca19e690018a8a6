"""Config values checked before any expensive work: data loading, model building or an MLflow run.

Every check here needs only the composed config and the file system, so a typo costs a second,
not an epoch. Each refusal is one `ExperimentError` saying what was wrong and how to fix it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from experiments.core.errors import ExperimentError

RESUME_MODES = ("auto", "never")
# The first bytes of the weight formats `build_backbone` can load.
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def validate_config(cfg: DictConfig) -> None:
    """Refuse the first bad value of `cfg` that can be found without the data."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        hint = " (e.g. task.path=/data/my_images)" if "task.path" in missing else ""
        raise ExperimentError(
            f"{', '.join(missing)} must be set; add {missing[0]}=<value> to the command{hint}"
        )
    try:
        for check in CHECKS:
            check(cfg)
    except OmegaConfBaseException as err:  # an interpolation that cannot resolve
        raise ExperimentError(f"the config does not resolve: {str(err).splitlines()[0]}") from None


# A batch larger than this is a typo (1e9), not a plan: it would be allocated before training.
MAX_BATCH = 65536


def number(cfg, key: str, kind: type, *, low: float, low_open: bool = False, high=None):
    """The value at dotted `key` as `kind`, refused unless it is in range."""
    value = OmegaConf.select(cfg, key)
    try:
        if isinstance(value, bool) or value is None:
            raise ValueError
        converted = kind(value)
        if kind is int and converted != float(value):
            raise ValueError
        if not math.isfinite(converted):  # 1e400 reads as inf
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise ExperimentError(
            f"{key}={value} is not {'an integer' if kind is int else 'a finite number'}; "
            f"e.g. {key}={'16' if kind is int else '1e-3'}"
        ) from None
    too_low = converted <= low if low_open else converted < low
    if too_low or (high is not None and converted > high):
        bound = f"greater than {low}" if low_open else f"at least {low}"
        bound += f" and at most {high}" if high is not None else ""
        raise ExperimentError(f"{key}={value} must be {bound}")
    return converted


def check_trainer(cfg) -> None:
    number(cfg, "optimizer.lr", float, low=0, low_open=True)
    number(cfg, "trainer.batch_size", int, low=1, high=MAX_BATCH)
    number(cfg, "trainer.epochs", int, low=1)
    for callback in ("early_stopping", "reduce_lr"):
        if OmegaConf.select(cfg, f"trainer.{callback}.patience") is not None:
            number(cfg, f"trainer.{callback}.patience", int, low=0)
    check_monitors(cfg)
    number(cfg, "trainer.seed", int, low=0)
    number(cfg, "trainer.repeats", int, low=1)
    if str(cfg.trainer.class_weight) not in ("none", "balanced", "None"):
        raise ExperimentError(
            f"trainer.class_weight={cfg.trainer.class_weight} is unknown; use none or balanced"
        )
    resume = str(cfg.get("resume", "auto"))
    if resume not in RESUME_MODES and not (len(resume) == 32 and resume.isalnum()):
        raise ExperimentError(
            f"resume={resume} is unknown; use auto (continue an interrupted run of the same "
            f"config), never (always start a new run) or the 32-character id of a run"
        )


# What Keras' logs hold at the end of an epoch, which a checkpoint or callback can monitor.
MONITORED = ("val_accuracy", "val_loss", "accuracy", "loss")


def check_monitors(cfg) -> None:
    """`trainer.monitor`, and the monitor of each enabled callback."""
    keys = ["trainer.monitor"]
    for callback in ("early_stopping", "reduce_lr"):
        if OmegaConf.select(cfg, f"trainer.{callback}.enabled"):
            keys.append(f"trainer.{callback}.monitor")
    for key in keys:
        value = OmegaConf.select(cfg, key)
        if value not in MONITORED:
            raise ExperimentError(
                f"{key}={value} is not a metric Keras logs each epoch; use one of "
                f"{', '.join(MONITORED)}"
            )


def check_runtime(cfg) -> None:
    """`backend`, `trainer.jit_compile`, `trainer.precision`, `trainer.steps_per_execution`
    and `trainer.data_on_device`."""
    from experiments.core.backend import PRECISIONS, known_backend

    known_backend(cfg.backend)

    if str(cfg.trainer.jit_compile).lower() not in ("auto", "true", "false"):
        raise ExperimentError(
            f"trainer.jit_compile={cfg.trainer.jit_compile} is not auto, true or false"
        )
    if str(cfg.trainer.precision) not in PRECISIONS:
        raise ExperimentError(
            f"trainer.precision={cfg.trainer.precision} is unknown; "
            f"use one of {', '.join(PRECISIONS)}"
        )
    if str(cfg.trainer.get("steps_per_execution", "auto")).lower() != "auto":
        number(cfg, "trainer.steps_per_execution", int, low=1)
    jax_switch(cfg, "trainer.data_on_device", "keeps the training data on a JAX device")
    check_devices(cfg)


def check_devices(cfg) -> None:
    """`trainer.devices`: 1, a number, or auto, on JAX for more than 1, dividing the global
    batch (how many devices there are is checked once the backend is imported)."""
    setting = OmegaConf.select(cfg, "trainer.devices", default=1)
    auto = str(setting) == "auto"
    devices = None if auto else number(cfg, "trainer.devices", int, low=1)
    if str(setting) != "1" and str(cfg.backend) != "jax":
        raise ExperimentError(
            f"trainer.devices={setting} splits each batch across devices with keras.distribution, "
            f"which Keras runs on JAX only; add backend=jax, or use trainer.devices=1"
        )
    batch = int(cfg.trainer.batch_size)
    if devices and batch % devices:
        larger = (batch // devices + 1) * devices
        raise ExperimentError(
            f"trainer.batch_size={batch} does not split evenly across trainer.devices={devices}; "
            f"use a multiple of {devices}, e.g. trainer.batch_size={larger}"
        )


def jax_switch(cfg, key: str, does: str) -> None:
    """A setting that is `auto`, `true` or `false`, where `true` asks for what only the JAX
    backend `does`."""
    given = OmegaConf.select(cfg, key, default="auto")
    value = str(given).lower()
    if value not in ("auto", "true", "false"):
        raise ExperimentError(f"{key}={given} is not auto, true or false")
    if value == "true" and str(cfg.backend) != "jax":
        raise ExperimentError(
            f"{key}=true {does}, but backend={cfg.backend}; add backend=jax, or use {key}=auto"
        )


def check_strategy(cfg) -> None:
    from experiments.training.strategies import STRATEGIES

    name = cfg.strategy.name
    if name not in STRATEGIES:
        raise ExperimentError(f"strategy.name={name!r} is unknown; use one of {sorted(STRATEGIES)}")
    if name == "fine_tune":
        blocks = list(cfg.backbone.blocks)
        number(cfg, "strategy.unfreeze_blocks", int, low=1, high=len(blocks))
        number(cfg, "strategy.lr", float, low=0, low_open=True)
        number(cfg, "strategy.epochs", int, low=1)


def check_head(cfg) -> None:
    from experiments.model.heads import POOLING

    if cfg.head.pooling not in POOLING:
        raise ExperimentError(f"head.pooling={cfg.head.pooling!r} is unknown; use one of {POOLING}")
    units = cfg.head.units
    if not OmegaConf.is_list(units) or not all(
        isinstance(u, int) and not isinstance(u, bool) and u >= 1 for u in units
    ):
        raise ExperimentError(
            f"head.units={units} must be a list of positive integers, e.g. head.units=[256,128]"
        )
    number(cfg, "head.dropout", float, low=0)
    if float(cfg.head.dropout) >= 1:
        raise ExperimentError(f"head.dropout={cfg.head.dropout} must be below 1, e.g. 0.3")


def check_task(cfg) -> None:
    from experiments.data.splits import check_fractions, check_image_size
    from experiments.data.tasks import LOADERS

    if cfg.task.loader not in LOADERS:
        raise ExperimentError(
            f"task.loader={cfg.task.loader!r} is unknown; use one of {sorted(LOADERS)}"
        )
    check_image_size(cfg.task.image_size)
    if not cfg.task.get("per_class"):
        check_fractions(cfg.task.split)
    if cfg.task.loader == "folder":
        root = Path(str(cfg.task.path)).expanduser()
        if not root.is_dir():
            raise ExperimentError(
                f"task.path={cfg.task.path} is not a directory; point it at a folder with one "
                f"subfolder per class, or with train/, val/ and test/ folders that each hold "
                f"class subfolders"
            )
    check_folds(cfg)


def check_folds(cfg) -> None:
    """`task.folds` (and a single run's `task.fold`): at least 2, no more than the smallest
    class's train and val images, and never over a fixed train/val/test folder layout."""
    from experiments.data.folds import pool_sizes, too_many_folds
    from experiments.data.splits import SPLITS

    if cfg.task.get("folds") is None:
        if cfg.task.get("fold") is not None:
            raise ExperimentError(f"task.fold={cfg.task.fold} needs task.folds; e.g. task.folds=5")
        return
    folds = number(cfg, "task.folds", int, low=2)
    if cfg.task.get("fold") is not None:
        number(cfg, "task.fold", int, low=0, high=folds - 1)
    if cfg.task.loader == "folder":
        root = Path(str(cfg.task.path)).expanduser()
        if any((root / s).is_dir() for s in SPLITS):
            raise ExperimentError(
                f"task.folds={folds} cannot rotate {root}'s fixed train/, val/ and test/ "
                f"folders; put the train and val images in class folders (task.split decides "
                f"the test split), or drop task.folds"
            )
    sizes = pool_sizes(cfg.task)
    if sizes is not None and folds > min(sizes):
        raise ExperimentError(too_many_folds(folds, min(sizes)))


def check_weights(cfg) -> None:
    """A local weights file must be readable and HDF5 (`.h5` or Keras 3 `.weights.h5`)."""
    weights = cfg.backbone.weights
    if weights is None or str(weights).lower() in ("none", "null", "random", "imagenet"):
        return
    if str(weights).startswith("pkg://"):
        return  # resolve_weights finds the package's file and names the missing package
    path = Path(str(weights)).expanduser()
    try:
        with open(path, "rb") as f:
            head = f.read(len(HDF5_SIGNATURE))
    except OSError as err:
        raise ExperimentError(
            f"backbone.weights={weights} cannot be read ({err.strerror}); give a readable "
            f"weights file, 'imagenet' or null"
        ) from None
    if head != HDF5_SIGNATURE:
        raise ExperimentError(
            f"backbone.weights={weights} is not an HDF5 weights file (.h5 from "
            f"keras.applications, or a Keras 3 .weights.h5); give such a file, 'imagenet' or null"
        )


# The metrics a training run records that `optimized_metric` may name: each epoch's (Keras' logs
# and callbacks.EpochLogger; a sweeper gets the saved epoch's), and the final ones
# (evaluation.summary). tests/test_tracking.py checks them against a real run's records.
EPOCH_METRICS = (
    "loss",
    "accuracy",
    "val_loss",
    "val_accuracy",
    "learning_rate",
    "epoch_time_s",
    "train_images_per_s",
)
FINAL_METRICS = (
    "test_loss",
    "test_accuracy",
    "test_accuracy_ci95_low",
    "test_accuracy_ci95_high",
    "best_val_accuracy",
    "saved_val_accuracy",
    "saved_val_loss",
    "saved_epoch",
    "final_train_accuracy",
    "epochs_run",
    "train_time_s",
    "total_params",
    "trainable_params",
    "skipped_files",
    "turned_files",
    "model_size_mb",
    "test_ece",
    "test_brier",
    "test_nll",
)


def check_metric(cfg) -> None:
    metric = cfg.get("optimized_metric", "val_accuracy")
    names = [metric] if isinstance(metric, str) or metric is None else list(metric)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ExperimentError(
            f"optimized_metric={metric} must name a metric, or several as a list; e.g. "
            f"optimized_metric=val_accuracy or optimized_metric=[val_accuracy,train_time_s]"
        )
    for name in names:
        if name not in EPOCH_METRICS + FINAL_METRICS:
            raise ExperimentError(
                f"optimized_metric={name} is not a metric a run records; use a per-epoch one "
                f"({', '.join(EPOCH_METRICS)}; the saved epoch's counts) or a final one "
                f"({', '.join(FINAL_METRICS)})"
            )
        allowed = cfg.get("allow_test_selection", False)
        if not isinstance(allowed, bool):
            raise ExperimentError(f"allow_test_selection={allowed} must be true or false")
        if name.startswith("test_") and not allowed:
            from experiments.comparison.selection import choosing_by_test

            raise ExperimentError(choosing_by_test(f"optimized_metric={name}"))


def check_recording(cfg) -> None:
    """`tracking.system_metrics*` and `evaluation.*`."""
    if not isinstance(cfg.tracking.get("system_metrics", True), bool):
        raise ExperimentError(
            f"tracking.system_metrics={cfg.tracking.system_metrics} must be true or false"
        )
    number(cfg, "tracking.system_metrics_interval_s", float, low=0, low_open=True)
    for key, default in (("temperature_scaling", False), ("figure_worker", True)):
        value = OmegaConf.select(cfg, f"evaluation.{key}", default=default)
        if not isinstance(value, bool):
            raise ExperimentError(f"evaluation.{key}={value} must be true or false")
    jax_switch(cfg, "evaluation.compile_ahead", "compiles the forward pass with JAX")


def check_code(cfg) -> None:
    """The `_target_` of every group, the backbone's module and constructor, the activation."""
    from experiments.pipeline.instantiation import check_names, check_targets

    check_targets(cfg)
    check_names(cfg)


CHECKS: list[Callable[[DictConfig], None]] = [
    check_code,
    check_trainer,
    check_runtime,
    check_strategy,
    check_head,
    check_task,
    check_weights,
    check_metric,
    check_recording,
]
