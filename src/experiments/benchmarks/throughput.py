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

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

log = logging.getLogger(__name__)

REFERENCE_AUGMENTATION = "reference"
FINE_TUNE_BLOCKS = 2  # strategy=fine_tune's default, unless strategy.unfreeze_blocks is given


def measure(cfg, images: int, repeats: int = 2) -> dict:
    """One row of rates for the backbone of `cfg`, on `images` random images per pass: each the
    best of `repeats` timed passes after the one that compiles (a shared machine is noisy)."""
    import keras

    from experiments.core.backend import device_tags, set_seed, use_precision
    from experiments.model.backbones import build_backbone, unfreeze_top_blocks
    from experiments.training.compiling import jit_compile

    keras.backend.clear_session(free_memory=True)
    use_precision(cfg.trainer.precision)
    set_seed(cfg.trainer.seed)
    shape = (*map(int, cfg.task.image_size), 3)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (images, *shape), dtype=np.uint8)
    y = rng.integers(0, CLASSES, images)
    bench = _Bench(cfg, shape, jit_compile(cfg.trainer.jit_compile), repeats)
    base, preprocess = build_backbone(cfg.backbone, shape, None)
    row = {
        "backbone": str(cfg.backbone.name),
        **{k: v for k, v in device_tags().items() if k in ("backend", "device")},
        "jit_compile": bench.compiled,
        "precision": str(cfg.trainer.precision),
        "image_size": shape[0],
        "batch_size": bench.batch,
        "images": images,
        "repeats": repeats,
    }
    row["floor_images_per_s"] = floor_rate(base, preprocess, shape, x, bench)
    inputs = keras.Input(shape)
    extractor = keras.Model(inputs, base(preprocess(inputs), training=False))
    reduced = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(extractor.output))
    row["predict_images_per_s"], _ = bench.predict_rate(reduced, x)

    model = bench.model(base, preprocess, REFERENCE_AUGMENTATION)
    row["inline_images_per_s"], row["compile_s"] = bench.train_rate(model, x, y)
    row["inrun_images_per_s"] = bench.in_run_rate(
        bench.model(base, preprocess, REFERENCE_AUGMENTATION), x, y
    )
    row["inline_noaug_images_per_s"], _ = bench.train_rate(
        bench.model(base, preprocess, "none"), x, y
    )
    row["extract_images_per_s"], features = bench.predict_rate(extractor, x)
    features = np.asarray(features, dtype=np.float32)
    row["head_images_per_s"], _ = bench.train_rate(bench.head(features.shape[1:]), features, y)

    blocks = OmegaConf.select(cfg, "strategy.unfreeze_blocks", default=FINE_TUNE_BLOCKS)
    unfreeze_top_blocks(base, list(cfg.backbone.blocks), int(blocks))
    row["fine_tune_images_per_s"], _ = bench.train_rate(model, x, y)
    base.trainable = False

    floor = row["floor_images_per_s"]
    row["inline_floor_ratio"] = row["inline_images_per_s"] / floor
    row["inrun_floor_ratio"] = row["inrun_images_per_s"] / floor
    row["predict_floor_ratio"] = row["predict_images_per_s"] / floor
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}


CLASSES = 5


def floor_rate(base, preprocess, shape, x: np.ndarray, bench: _Bench) -> float:
    """The hardware's floor for this base: its forward pass, uint8 in, cast and preprocessed
    inside, output reduced on the device, compiled, over batches already on the device: no host
    feed, no predict loop. Training runs this forward pass and more, so no rate here beats it."""
    import keras

    inputs = keras.Input(shape, dtype="uint8")
    features = base(preprocess(keras.ops.cast(inputs, "float32")), training=False)
    model = keras.Model(inputs, keras.ops.mean(features, axis=[1, 2, 3]))
    batches = [x[i : i + bench.batch] for i in range(0, len(x) - bench.batch + 1, bench.batch)]
    forward, put = _device_forward(model, bench.compiled)
    on_device = [put(batch) for batch in batches]
    forward(on_device[0])  # compiles
    best = float("inf")
    for _ in range(bench.repeats):
        started = time.perf_counter()
        total = sum(forward(batch) for batch in on_device)
        float(keras.ops.convert_to_numpy(total))  # waits for the device
        best = min(best, time.perf_counter() - started)
    return len(on_device) * bench.batch / best


def _device_forward(model, compiled: bool):
    """(a compiled forward pass returning a device scalar, a host-to-device copy) for the
    backend Keras runs on."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        trainable = [v.value for v in model.trainable_variables]
        frozen = [v.value for v in model.non_trainable_variables]

        @jax.jit
        def forward_jax(trainable, frozen, batch):
            y, _ = model.stateless_call(trainable, frozen, batch, training=False)
            return jnp.sum(y.astype(jnp.float32))

        return (lambda batch: forward_jax(trainable, frozen, batch)), jax.device_put
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=compiled)
        def forward_tf(batch):
            return tf.reduce_sum(tf.cast(model(batch, training=False), tf.float32))

        return forward_tf, tf.constant
    import torch

    def forward_torch(batch):
        with torch.no_grad():
            return model(batch, training=False).float().sum()

    return forward_torch, keras.ops.convert_to_tensor


class _Bench:
    """Builds the models a run would and times them the same way, pass after pass."""

    def __init__(self, cfg, shape, compiled: bool, repeats: int):
        self.cfg, self.shape, self.compiled, self.repeats = cfg, shape, compiled, repeats
        self.batch = int(cfg.trainer.batch_size)

    def context(self, base, preprocess, augmentation: str, workdir=None):
        from experiments import compose_project_config
        from experiments.training.checkpoints import RunCheckpoints
        from experiments.training.strategies import Context

        node = compose_project_config([f"augmentation={augmentation}"]).augmentation
        local = OmegaConf.merge(self.cfg, {"augmentation": node})
        shapes = _Shapes(self.shape, CLASSES)
        state = RunCheckpoints(Path(workdir)) if workdir else None
        return Context(local, shapes, base, preprocess, Path("."), "random", state)

    def head(self, features_shape):
        from experiments.model.heads import build_head

        return build_head(self.cfg.head, features_shape, CLASSES)

    def model(self, base, preprocess, augmentation: str):
        from experiments.training.strategies import assemble

        ctx = self.context(base, preprocess, augmentation)
        return assemble(ctx, self.head(base.output.shape[1:]), augment=augmentation != "none")

    def train_rate(self, model, inputs, labels) -> tuple[float, float]:
        """(images/s of the best pass, compile seconds) of `model.fit` on the batches."""
        import keras

        from experiments.data.inputs import batches, on_device
        from experiments.training.callbacks import EpochLogger
        from experiments.training.compiling import steps_per_execution

        model.compile(
            optimizer=keras.optimizers.Adam(1e-4),
            loss="sparse_categorical_crossentropy",
            jit_compile=self.compiled,
            steps_per_execution=steps_per_execution(self.cfg.trainer.get("steps_per_execution", 1)),
        )
        device = on_device(self.cfg.trainer.get("data_on_device", "auto"), inputs, "images")
        data = batches(inputs, labels, batch_size=self.batch, shuffle=True, device=device)
        callbacks = [EpochLogger(len(labels))]
        logs = model.fit(data, epochs=1 + self.repeats, verbose=0, callbacks=callbacks).history
        seconds = logs["epoch_time_s"]
        return max(logs["train_images_per_s"][1:]), seconds[0] - min(seconds[1:])

    def in_run_rate(self, model, inputs, labels) -> float:
        """Images/s of training as a run trains: `strategies.fit` itself, with its callbacks
        (epoch backups, best checkpoint, signals) and a validation split of a quarter."""
        import tempfile

        from experiments.training.callbacks import EpochLogger
        from experiments.training.strategies import _dataset, fit

        val = max(len(labels) // 4, self.batch)
        with tempfile.TemporaryDirectory(prefix="experiments-inrun-") as tmp:
            ctx = self.context(None, None, "none", workdir=tmp)
            ctx.callbacks = [EpochLogger(len(labels))]
            train = _dataset(inputs, labels, self.batch, ctx, shuffle=True)
            held = _dataset(inputs[:val], labels[:val], self.batch, ctx, shuffle=False)
            history = fit(ctx, model, train, held, epochs=1 + self.repeats)
        return max(history["train_images_per_s"][1:])

    def predict_rate(self, model, inputs) -> tuple[float, np.ndarray]:
        """(images/s of the best pass, the outputs) of `model.predict`, as evaluation runs."""
        from experiments.data.inputs import batches

        model.compile(jit_compile=self.compiled)
        data = batches(inputs, batch_size=self.batch)
        out = model.predict(data, verbose=0)
        best = float("inf")
        for _ in range(self.repeats):
            started = time.perf_counter()
            model.predict(data, verbose=0)
            best = min(best, time.perf_counter() - started)
        return len(inputs) / best, out


class _Shapes:
    """What `assemble` reads of a task: its image shape and class count."""

    def __init__(self, image_shape, num_classes):
        self.image_shape, self.num_classes = image_shape, num_classes


COLUMNS = {
    "backbone": "backbone",
    "backend": "backend",
    "precision": "precision",
    "jit_compile": "jit",
    "floor_images_per_s": "floor img/s",
    "inline_images_per_s": "inline (reference aug) img/s",
    "inrun_images_per_s": "in-run img/s",
    "predict_images_per_s": "predict (evaluation) img/s",
    "inline_noaug_images_per_s": "inline (no aug) img/s",
    "extract_images_per_s": "two-stage extract img/s",
    "head_images_per_s": "two-stage head img/s",
    "fine_tune_images_per_s": "fine-tune img/s",
    "inline_floor_ratio": "inline / floor",
    "inrun_floor_ratio": "in-run / floor",
    "predict_floor_ratio": "predict / floor",
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
    from experiments.core.backend import device_tags

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


def parse_throughput_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.benchmark throughput",
        description=(
            "Images/s of the frozen base's inference, inline training with and without the "
            "reference augmentation, two-stage extraction and head training, and fine-tuning, "
            "for each backbone, on random weights and random images (works offline). The "
            "default is the reference model: VGG19, 180 px, batch 16."
        ),
    )
    parser.add_argument(
        "--batches", type=int, default=16, help="batches per timed pass (default 16)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="timed passes per rate after the compiling one; the best counts (default 2)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for benchmark-throughput.{md,json} (default: paths.reports_dir)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help="config overrides: backbone=vgg19,resnet50 (several), backend=jax, "
        "task.image_size=[224,224], trainer.batch_size=64, trainer.precision=mixed_bfloat16",
    )
    args = parser.parse_intermixed_args(argv)
    if args.batches < 2:
        parser.error(f"--batches={args.batches} is too few; use 2 or more")
    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats} must be at least 1")
    return args


def throughput_main(argv: list[str]) -> int:
    from experiments import compose_project_config
    from experiments.core.backend import use_backend
    from experiments.core.errors import ExperimentError

    args = parse_throughput_args(argv)
    backbones = [o for o in args.overrides if o.startswith("backbone=")]
    others = [o for o in args.overrides if not o.startswith("backbone=")]
    names = backbones[-1].split("=", 1)[1].split(",") if backbones else [None]
    try:
        configs = [
            compose_project_config([*others, *([f"backbone={n}"] if n else [])]) for n in names
        ]
        use_backend(configs[0].backend)
    except ExperimentError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = []
    for cfg in configs:
        images = args.batches * int(cfg.trainer.batch_size)
        print(f"measuring {cfg.backbone.name} on {images} images per pass ...", flush=True)
        rows.append(measure(cfg, images, args.repeats))
        print(json.dumps(rows[-1]), flush=True)
    out = args.out or Path(configs[0].paths.reports_dir)
    print(report(rows, out))
    run_id = record(configs[0], rows, out)
    print(f"saved {out / 'benchmark-throughput.md'} and .json; MLflow run {run_id}")
    return 0
