"""Compiling the train step for the device: `trainer.jit_compile`, `trainer.steps_per_execution`,
a warning where Keras turned compiling off, and the model built before `fit`."""

from __future__ import annotations

import logging

from experiments.core.backend import current_backend

log = logging.getLogger(__name__)


def jit_compile(setting) -> bool:
    """`trainer.jit_compile` as a bool. `auto` compiles where compiling is faster: jit on JAX
    (always), XLA on TensorFlow with a GPU. TensorFlow on a CPU runs its graph without XLA, as
    Keras' own `auto` does: XLA's CPU convolutions measured slower there (VGG16 inference 55
    against 61 images/s at 64 px, and a 3x3 convolution of a 2x2 map takes 0.4 s). PyTorch runs
    eagerly: `torch.compile` of a Keras train step is not dependable."""
    if isinstance(setting, bool):
        return setting
    text = str(setting).lower()
    if text == "auto":
        backend = current_backend()
        if backend == "tensorflow":
            import tensorflow as tf

            return bool(tf.config.list_physical_devices("GPU"))
        return backend == "jax"
    return text == "true"  # validate_config refused anything else


# Train steps one compiled call runs on an accelerator with `trainer.steps_per_execution=auto`: a
# small step (the reference's batch of 16 takes ~2 ms of an H200) otherwise waits on Python to
# dispatch it.
ACCELERATOR_STEPS = 16


def steps_per_execution(setting) -> int:
    """`trainer.steps_per_execution` as a count. `auto` is ACCELERATOR_STEPS on a GPU or TPU and
    1 on a CPU, where a step's compute outweighs its dispatch."""
    if str(setting).lower() != "auto":
        return int(setting)  # validate_config refused anything else
    backend = current_backend()
    if backend == "jax":
        import jax

        accelerated = any(d.platform != "cpu" for d in jax.devices())
    elif backend == "tensorflow":
        import tensorflow as tf

        accelerated = bool(tf.config.list_physical_devices("GPU"))
    else:
        import torch

        accelerated = torch.cuda.is_available()
    return ACCELERATOR_STEPS if accelerated else 1


def check_compiled(model, asked: bool) -> None:
    """Warn once when Keras turned compilation off for `model` although it was asked."""
    if asked and not model.jit_compile:
        layers = sorted({type(x).__name__ for x in model._flatten_layers() if not x.supports_jit})
        log.warning(
            "model %s trains uncompiled: %s cannot be compiled (trainer.jit_compile=true asked "
            "for it); on a GPU that is up to 100x slower",
            model.name,
            ", ".join(layers) or "a layer",
        )


def build_for_training(model, batch) -> None:
    """Create `model`'s optimizer, loss and metric state from `batch`'s shapes before `fit`.

    Without a distribution strategy, Keras' TensorFlow trainer defers that to the first trace
    of the train step, and a `tf.function` whose first trace creates variables is traced a
    second time: 0.07-0.1 s of every fit of the quickstart's head on this project's CPU. Keras'
    JAX trainer, and its TensorFlow trainer under a strategy, build first with
    `Trainer._symbolic_build`, from shapes only; it is private, so where a Keras lacks it the
    fit builds as before.
    """
    import keras

    build = getattr(model, "_symbolic_build", None)
    if keras.backend.backend() != "tensorflow" or build is None:
        return
    build(data_batch=batch)
