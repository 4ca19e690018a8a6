"""The strategy group: inline, two-stage and fine-tune training of a head on a frozen base."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from experiments.core.errors import ExperimentError
from experiments.core.files import atomic_dir, read_cache
from experiments.data.arrays import open_rows
from experiments.data.folds import pooled_rows
from experiments.data.splits import SPLITS, Split, Task
from experiments.model.backbones import unfreeze_top_blocks
from experiments.model.heads import build_head, loss_for
from experiments.training.checkpoints import RunCheckpoints

log = logging.getLogger(__name__)


@dataclass
class Context:
    """What every strategy needs: the config, the data, the base and where to write."""

    cfg: object
    task: Task
    base: object
    preprocess: Callable
    workdir: Path
    weights_id: str
    checkpoints: RunCheckpoints
    # Keras callbacks that run before the epoch's backup (they add to its logs), and after it
    # (they report the backed-up epoch: MLflow metrics, pruning).
    callbacks: list = field(default_factory=list)
    reporters: list = field(default_factory=list)


@dataclass
class Trained:
    """A model that maps raw 0-255 RGB images to class probabilities, and its epoch history.

    `head` and `features`, for two-stage: the validation and test splits are evaluated by the
    head on the base's cached features, the same computation as the model on the images without
    running the base over them again.
    """

    model: object
    history: dict[str, list[float]]
    feature_cache: str | None = None
    unfrozen: list[str] = field(default_factory=list)
    head: object = None
    features: dict[str, np.ndarray] | None = None

    @property
    def eval_model(self):
        """What evaluates a split: the head on features, or the model on images."""
        return self.model if self.features is None else self.head

    def eval_split(self, task: Task, name: str = "test"):
        """The split `name` as `eval_model` reads it."""
        split = task.splits[name]
        if self.features is None:
            return split
        return Split(self.features[name], split.labels, split.sources)


def train_inline(ctx: Context) -> Trained:
    """Augmentation -> preprocessing -> frozen base -> head, trained end to end on raw images."""
    model = assemble(ctx, build_head(ctx.cfg.head, ctx.base.output.shape[1:], ctx.task.num_classes))
    history = fit(ctx, model, images_dataset(ctx, "train"), images_dataset(ctx, "val"))
    return Trained(model, history)


def train_two_stage(ctx: Context) -> Trained:
    """Features extracted once and cached on disk; the head trained on them; base + head saved."""
    if ctx.cfg.augmentation.layers:
        log.warning(
            "strategy=two_stage trains on features extracted once, without augmentation: "
            "augmentation=%s is not applied (use strategy=inline or fine_tune to train with it, "
            "or augmentation=none); the run is tagged augmentation_applied=false",
            ctx.cfg.augmentation.name,
        )
    features, cache = extract_features(ctx)
    head = build_head(ctx.cfg.head, features["train"].shape[1:], ctx.task.num_classes)
    batch = int(ctx.cfg.trainer.batch_size)
    train = _dataset(features["train"], ctx.task.splits["train"].labels, batch, ctx, shuffle=True)
    val = _dataset(features["val"], ctx.task.splits["val"].labels, batch, ctx, shuffle=False)
    history = fit(ctx, head, train, val)
    model = assemble(ctx, head, augment=False)
    evaluated = {name: features[name] for name in ("val", "test")}
    return Trained(model, history, cache, head=head, features=evaluated)


def train_fine_tune(ctx: Context) -> Trained:
    """Train the head as inline does, then unfreeze the top blocks and go on at a low rate."""
    cfg = ctx.cfg
    head = build_head(cfg.head, ctx.base.output.shape[1:], ctx.task.num_classes)
    model = assemble(ctx, head)
    train, val = images_dataset(ctx, "train"), images_dataset(ctx, "val")
    history = fit(ctx, model, train, val)
    unfrozen = unfreeze_top_blocks(
        ctx.base, list(cfg.backbone.blocks), int(cfg.strategy.unfreeze_blocks)
    )
    log.info("fine-tuning %d layers at lr %g: %s", len(unfrozen), cfg.strategy.lr, unfrozen)
    # One best checkpoint across both phases, so the best epoch of either is what is restored.
    more = fit(
        ctx,
        model,
        train,
        val,
        phase="fine_tune",
        lr=float(cfg.strategy.lr),
        initial_epoch=int(cfg.trainer.epochs),
        epochs=int(cfg.trainer.epochs) + int(cfg.strategy.epochs),
    )
    return Trained(
        model, {k: history.get(k, []) + more.get(k, []) for k in history | more}, unfrozen=unfrozen
    )


STRATEGIES: dict[str, Callable[[Context], Trained]] = {
    "inline": train_inline,
    "two_stage": train_two_stage,
    "fine_tune": train_fine_tune,
}


def train_with_strategy(ctx: Context) -> Trained:
    """The trained model of the strategy named by `strategy.name`."""
    strategy = STRATEGIES.get(ctx.cfg.strategy.name)
    if strategy is None:
        raise ExperimentError(
            f"strategy.name={ctx.cfg.strategy.name!r} is unknown; use one of {sorted(STRATEGIES)}"
        )
    return strategy(ctx)


# ---------------------------------------------------------------------------------------------


def assemble(ctx: Context, head, augment: bool = True):
    """Raw 0-255 RGB images -> [augmentation] -> preprocess_input -> base -> head."""
    import keras

    from experiments.model.augmentation import build_augmentation

    # float32 in the model, uint8 from the pipeline: Keras casts each batch on the device.
    inputs = keras.Input(ctx.task.image_shape, name="image")
    x = inputs
    augmentation = build_augmentation(ctx.cfg.augmentation) if augment else None
    if augmentation is not None:
        x = augmentation(x)
    x = ctx.preprocess(x)
    # training=False keeps BatchNorm in inference mode, frozen or fine-tuned.
    x = ctx.base(x, training=False)
    name = f"{ctx.cfg.backbone.name}_{ctx.cfg.strategy.name}"
    return keras.Model(inputs, head(x), name=name)


def fit(
    ctx: Context,
    model,
    train,
    val,
    *,
    phase: str = "head",
    lr: float | None = None,
    initial_epoch: int = 0,
    epochs: int | None = None,
) -> dict[str, list[float]]:
    """Compile and fit `model`, then restore its best-validation weights; the epoch history.

    Resumable: every epoch is backed up, a phase that already finished is not run again, and an
    interrupted one continues from its last complete epoch (`experiments.training.checkpoints`).
    """
    from hydra.utils import instantiate

    from experiments.core import interrupts
    from experiments.training.callbacks import StopOnSignal
    from experiments.training.compiling import build_for_training

    cfg = ctx.cfg
    state = ctx.checkpoints
    end = int(epochs or cfg.trainer.epochs)
    compile_model(ctx, model, lr)
    if state.phase_done(phase):
        log.info("phase %s already trained; its weights are restored", phase)
        model.load_weights(state.done_path(phase))
        return state.history(initial_epoch, end)
    callbacks = [*ctx.callbacks, state.backup(phase, initial_epoch)]
    callbacks.append(state.best_checkpoint(phase, cfg.trainer.monitor))
    for name in ("early_stopping", "reduce_lr"):
        node = cfg.trainer[name]
        if node.enabled:
            callbacks.append(instantiate({k: v for k, v in node.items() if k != "enabled"}))
    build_for_training(model, train[0])
    with interrupts.deferred():
        model.fit(
            train,
            validation_data=val,
            epochs=end,
            initial_epoch=initial_epoch,
            class_weight=class_weights(cfg.trainer.class_weight, ctx.task),
            callbacks=[*callbacks, *ctx.reporters, StopOnSignal()],
            shuffle=False,  # the batches shuffle themselves
            verbose=2,
        )
    if cfg.trainer.restore_best:
        state.restore_best(phase, model)
    state.mark_phase_done(phase, model)
    return state.history(initial_epoch, end)


def compile_model(ctx: Context, model, lr: float | None = None) -> None:
    """Compile `model` with the run's optimizer at `lr`, its loss, accuracy and compilation
    (`trainer.jit_compile`); a warning when Keras turns compilation off."""
    from experiments.training.compiling import check_compiled, jit_compile, steps_per_execution

    compiled = jit_compile(ctx.cfg.trainer.jit_compile)
    model.compile(
        optimizer=make_optimizer(ctx.cfg.optimizer, lr),
        loss=loss_for(ctx.task.num_classes),
        metrics=["accuracy"],
        jit_compile=compiled,
        steps_per_execution=steps_per_execution(ctx.cfg.trainer.get("steps_per_execution", 1)),
    )
    check_compiled(model, compiled)


def make_optimizer(cfg, lr: float | None = None):
    """The optimizer of `cfg` (a `_partial_` `_target_` node) at `lr` or `cfg.lr`."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(cfg, resolve=True)
    rate = float(node.pop("lr") if lr is None else lr)
    node.pop("lr", None)
    if rate <= 0:
        raise ExperimentError(f"optimizer.lr={rate} must be positive, e.g. optimizer.lr=1e-3")
    return instantiate(node)(learning_rate=rate)


def class_weights(mode: str, task: Task) -> dict[int, float] | None:
    """None, or scikit-learn's 'balanced' weights for the train split's labels."""
    if mode in (None, "none"):
        return None
    if mode != "balanced":
        raise ExperimentError(f"trainer.class_weight={mode!r} is unknown; use none or balanced")
    from sklearn.utils.class_weight import compute_class_weight

    labels = task.splits["train"].labels
    classes = np.arange(task.num_classes)
    weights = compute_class_weight("balanced", classes=classes, y=labels)
    return {int(c): float(w) for c, w in zip(classes, weights, strict=True)}


def images_dataset(ctx: Context, split: str):
    """Batches of one split's uint8 images and labels, shuffled for training."""
    data = ctx.task.splits[split]
    return _dataset(
        data.images, data.labels, int(ctx.cfg.trainer.batch_size), ctx, shuffle=split == "train"
    )


def _dataset(x: np.ndarray, y: np.ndarray | None, batch_size: int, ctx: Context, shuffle: bool):
    """Batches for training (`shuffle`), or validation, in batches of one size where one near
    `batch_size` divides the split (`inputs.even_batch_size`), gathered on the accelerator
    where `trainer.data_on_device` keeps the split there (`inputs.on_device`)."""
    from experiments.data.inputs import batches, even_batch_size, on_device

    if not shuffle:
        batch_size = even_batch_size(len(x), batch_size)
    setting = ctx.cfg.trainer.get("data_on_device", "auto")
    device = on_device(setting, x, "training data" if shuffle else "validation data")
    seed = int(ctx.cfg.trainer.seed)
    return batches(x, y, batch_size=batch_size, shuffle=shuffle, seed=seed, device=device)


def feature_key(ctx: Context) -> str:
    """The cache key of extracted features: backbone, weights, data digest and image size (of
    the task a fold was cut from: every fold reads the same features)."""
    cfg = ctx.cfg
    task = ctx.task.base or ctx.task
    parts = [cfg.backbone.name, ctx.weights_id, task.digest(), list(task.image_shape)]
    if ctx.weights_id == "random":  # random weights differ per seed
        parts.append(int(cfg.trainer.seed))
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]


def extract_features(ctx: Context) -> tuple[dict[str, np.ndarray], str]:
    """The base's feature maps of every split, memory-mapped from the disk cache ('hit') or
    extracted into it ('miss'), one `.npy` file per split written as the batches come."""
    import keras

    from experiments.data.arrays import RowWriter
    from experiments.model.forward import predict_in_batches

    path = (
        Path(ctx.cfg.paths.cache_dir) / "features" / f"{ctx.cfg.backbone.name}-{feature_key(ctx)}"
    )
    cached = read_cache(path, _read_features)
    if cached is not None:
        log.info("features reused from %s", path)
        return of_fold(ctx.task, cached), "hit"
    task = ctx.task.base or ctx.task  # a fold's: the whole task's, once for every fold
    inputs = keras.Input(task.image_shape)
    extractor = keras.Model(inputs, ctx.base(ctx.preprocess(inputs), training=False))
    shape = extractor.output.shape[1:]
    batch = max(int(ctx.cfg.trainer.batch_size), 64)
    with atomic_dir(path) as folder:  # a concurrent sweep job never reads half a cache
        for s in SPLITS:
            images = task.splits[s].images
            # float32 on the host whatever the precision: the head trains on them as its input
            writer = RowWriter(folder / f"{s}.npy", len(images), shape, np.float32)
            predict_in_batches(
                extractor,
                images,
                batch_size=batch,
                what=f"extracting {s} features",
                write=writer.append,
            )
            writer.close()
    log.info("features extracted to %s", path)
    return of_fold(ctx.task, _read_features(path)), "miss"


def of_fold(task: Task, features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The features of a fold's splits, taken from the whole task's (train rows, then val)."""
    if task.base is None:
        return features
    train, val = features["train"], features["val"]
    folded = {s: pooled_rows(train, val, task.rows[s]) for s in ("train", "val")}
    return folded | {"test": features["test"]}


def _read_features(path: Path) -> dict[str, np.ndarray]:
    return {s: open_rows(path / f"{s}.npy") for s in SPLITS}
