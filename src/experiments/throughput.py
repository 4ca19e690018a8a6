"""Training speed against the hardware's own limit: `python -m experiments.benchmark throughput`.

For each chosen backbone, on random weights and random uint8 images held in memory (so it runs
offline and measures compute, not decoding), in one process:
  - the frozen base's inference rate: its forward pass with the output reduced on the device (a
    global mean), the floor that training cannot beat; `model.predict` of the full feature maps
    would copy them all back to the host and understate it (up to 4x for ResNet50 on a GPU);
  - inline training with the reference augmentation, and without augmentation;
  - two-stage: feature extraction (full maps back to the host, as two_stage does), then head
    training on those features;
  - fine-tune: the top `strategy.unfreeze_blocks` blocks trainable;
  - the ratio of inline training to inference, and the compile time.
Every rate is images/s of the best of `--repeats` passes over the same batches after the first
one, which compiles.
Models are built by the same code as a training run (`strategies.assemble`, `heads`, `inputs`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

REFERENCE_AUGMENTATION = "reference"
FINE_TUNE_BLOCKS = 2  # strategy=fine_tune's default, unless strategy.unfreeze_blocks is given


def measure(cfg, images: int, repeats: int = 2) -> dict:
    """One row of rates for the backbone of `cfg`, on `images` random images per pass: each the
    best of `repeats` timed passes after the one that compiles (a shared machine is noisy)."""
    import keras
    from omegaconf import OmegaConf

    from experiments.backbones import build_backbone, unfreeze_top_blocks
    from experiments.backend import device_tags, jit_compile, use_precision
    from experiments.callbacks import EpochLogger
    from experiments.heads import build_head
    from experiments.inputs import batches

    keras.backend.clear_session(free_memory=True)
    use_precision(cfg.trainer.precision)
    keras.utils.set_random_seed(int(cfg.trainer.seed))
    shape = (*map(int, cfg.task.image_size), 3)
    batch = int(cfg.trainer.batch_size)
    classes = 5
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (images, *shape), dtype=np.uint8)
    y = rng.integers(0, classes, images)
    compiled = jit_compile(cfg.trainer.jit_compile)
    base, preprocess = build_backbone(cfg.backbone, shape, None)

    def model_with(head, augmentation: str):
        from experiments import compose_project_config
        from experiments.strategies import Context, assemble

        node = compose_project_config([f"augmentation={augmentation}"]).augmentation
        local = OmegaConf.merge(cfg, {"augmentation": node})
        ctx = Context(local, _Shapes(shape, classes), base, preprocess, Path("."), "random", None)
        return assemble(ctx, head, augment=augmentation != "none")

    def head_for(features_shape):
        return build_head(cfg.head, features_shape, classes)

    def train_rate(model, inputs, labels) -> tuple[float, float]:
        model.compile(
            optimizer=keras.optimizers.Adam(1e-4),
            loss="sparse_categorical_crossentropy",
            jit_compile=compiled,
        )
        data = batches(inputs, labels, batch_size=batch, shuffle=True)
        callbacks = [EpochLogger(len(labels))]
        logs = model.fit(data, epochs=1 + repeats, verbose=0, callbacks=callbacks).history
        seconds = logs["epoch_time_s"]
        return max(logs["train_images_per_s"][1:]), seconds[0] - min(seconds[1:])

    def predict_rate(model, inputs) -> tuple[float, np.ndarray]:
        model.compile(jit_compile=compiled)
        data = batches(inputs, batch_size=batch)
        out = model.predict(data, verbose=0)
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            model.predict(data, verbose=0)
            best = min(best, time.perf_counter() - started)
        return len(inputs) / best, out

    row = {
        "backbone": str(cfg.backbone.name),
        **{k: v for k, v in device_tags().items() if k in ("backend", "device")},
        "jit_compile": compiled,
        "precision": str(cfg.trainer.precision),
        "image_size": shape[0],
        "batch_size": batch,
        "images": images,
        "repeats": repeats,
    }
    inputs = keras.Input(shape)
    reduced = keras.layers.GlobalAveragePooling2D()(base(preprocess(inputs), training=False))
    row["inference_images_per_s"], _ = predict_rate(keras.Model(inputs, reduced), x)

    model = model_with(head_for(base.output.shape[1:]), REFERENCE_AUGMENTATION)
    row["inline_images_per_s"], row["compile_s"] = train_rate(model, x, y)
    row["inline_noaug_images_per_s"], _ = train_rate(
        model_with(head_for(base.output.shape[1:]), "none"), x, y
    )
    inputs = keras.Input(shape)
    extractor = keras.Model(inputs, base(preprocess(inputs), training=False))
    row["extract_images_per_s"], features = predict_rate(extractor, x)
    features = np.asarray(features, dtype=np.float32)
    row["head_images_per_s"], _ = train_rate(head_for(features.shape[1:]), features, y)

    blocks = OmegaConf.select(cfg, "strategy.unfreeze_blocks", default=FINE_TUNE_BLOCKS)
    unfreeze_top_blocks(base, list(cfg.backbone.blocks), int(blocks))
    row["fine_tune_images_per_s"], _ = train_rate(model, x, y)
    base.trainable = False

    row["ratio"] = row["inline_images_per_s"] / row["inference_images_per_s"]
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}


class _Shapes:
    """What `assemble` reads of a task: its image shape and class count."""

    def __init__(self, image_shape, num_classes):
        self.image_shape, self.num_classes = image_shape, num_classes


COLUMNS = {
    "backbone": "backbone",
    "backend": "backend",
    "precision": "precision",
    "jit_compile": "jit",
    "inference_images_per_s": "inference img/s",
    "inline_images_per_s": "inline (reference aug) img/s",
    "inline_noaug_images_per_s": "inline (no aug) img/s",
    "extract_images_per_s": "two-stage extract img/s",
    "head_images_per_s": "two-stage head img/s",
    "fine_tune_images_per_s": "fine-tune img/s",
    "ratio": "inline / inference",
    "compile_s": "compile s",
}


def report(rows: list[dict], out: Path) -> str:
    """The rows as a Markdown table, saved with the JSON rows in `out`."""
    import pandas as pd

    table = pd.DataFrame(rows)[list(COLUMNS)].rename(columns=COLUMNS)
    first = rows[0]
    text = "\n".join(
        [
            f"device: {first['device']}; images {first['image_size']} px, batch "
            f"{first['batch_size']}, {first['images']} random uint8 images per pass, best of "
            f"{first['repeats']} passes, random weights",
            "",
            table.to_markdown(index=False, floatfmt=".2f"),
        ]
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark-throughput.md").write_text(text + "\n")
    (out / "benchmark-throughput.json").write_text(json.dumps(rows, indent=2) + "\n")
    return text


def record(cfg, rows: list[dict], out: Path) -> str:
    """One MLflow run in the `benchmark` experiment: rates as metrics, the tables as artifacts."""
    from omegaconf import OmegaConf

    from experiments import tracking
    from experiments.backend import device_tags

    tracking_cfg = OmegaConf.merge(cfg.tracking, {"experiment": "benchmark"})
    tags = device_tags() | {tracking.tags.RUN_TYPE: "benchmark", "benchmark": "throughput"}
    with tracking.start_run(tracking_cfg, "throughput", tags) as run:
        for row in rows:
            tracking.log_metrics(
                {
                    f"{row['backbone']}.{key}": float(value)
                    for key, value in row.items()
                    if key.endswith(("_per_s", "ratio", "compile_s"))
                }
            )
        for name in ("benchmark-throughput.md", "benchmark-throughput.json"):
            tracking.log_artifact(out / name)
    return run.run_id
