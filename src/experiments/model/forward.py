"""A model's forward pass, compiled while the model trains, for the evaluation that follows.

Keras compiles `predict`'s step the first time `predict` is called, after training: on an H200,
evaluating the reference run's 1,000 test images took 6.5 s on a fresh compilation cache and
1.2 s on a warm one, for about 0.1 s of compute (part of it was Keras ops compiled one by one,
gone since; the rest is tracing the model and compiling or loading its program). On JAX,
`CompileAhead` lowers and compiles the model's forward pass in a thread as `fit` begins (XLA
compiles outside the GIL, while the device trains), and the test split is then predicted by
that program (`predict_in_batches`). Keras has no way to compile `predict` ahead, and its own
step cannot be called on the side: it donates the model's state to each call.

The program takes the model's weights as arguments, so it predicts with whatever weights the
model holds when it is called (the best epoch's, restored after `fit`). One compiled for another
split of the weights into trainable and frozen is not used. One program is kept at a time, and
given up to the evaluation it was compiled for.

This module imports Keras: import it only after the backend is chosen (`experiments.core.backend`).
"""

from __future__ import annotations

import logging
import threading

import keras

log = logging.getLogger(__name__)

# The program compiled for the latest `fit`, until its evaluation takes it.
_prepared: dict[str, Forward] = {}


def compile_ahead(setting) -> bool:
    """Whether `evaluation.compile_ahead=setting` compiles the forward pass during training:
    `auto` on JAX with a GPU or TPU (on a CPU the compile would take cores from training, for
    a program that Keras' `predict` compiles in about the same time after it), `true` on JAX."""
    text = str(setting).lower()
    if text == "false" or keras.backend.backend() != "jax":
        return False
    if text == "true":
        return True
    import jax

    return any(d.platform != "cpu" for d in jax.devices())


class Forward:
    """`model`'s forward pass at inference on batches of `batch_shape`, compiled in a thread."""

    def __init__(self, model, batch_shape: tuple, dtype):
        self.model = model
        self.batch_shape = tuple(batch_shape)
        self._layout = _layout(model)
        self._compiled = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._compile, args=(dtype,), name="compile-ahead", daemon=True
        )
        self._thread.start()

    def _compile(self, dtype) -> None:
        import jax

        model = self.model

        def forward(trainable, frozen, x):
            outputs, _ = model.stateless_call(trainable, frozen, x, training=False)
            return outputs

        def specs(variables):
            return [jax.ShapeDtypeStruct(v.shape, v.dtype) for v in variables]

        try:
            lowered = jax.jit(forward).lower(
                specs(model.trainable_variables),
                specs(model.non_trainable_variables),
                jax.ShapeDtypeStruct(self.batch_shape, dtype),
            )
            self._compiled = lowered.compile()
        except Exception as err:  # evaluation falls back to Keras' predict
            self._error = err

    def usable(self) -> bool:
        """Whether this program predicts its model as the model is now (waiting for it)."""
        if _layout(self.model) != self._layout:  # trained since with other layers frozen
            return False
        self._thread.join()
        if self._error is not None:
            log.warning(
                "the forward pass compiled ahead failed (%s); evaluating with Keras' predict",
                self._error,
            )
            return False
        return True

    def __call__(self, x):
        """The outputs of a batch, on the device (dispatched, not awaited)."""
        model = self.model
        trainable = [v.value for v in model.trainable_variables]
        frozen = [v.value for v in model.non_trainable_variables]
        return self._compiled(trainable, frozen, x)


def _layout(model) -> tuple:
    """Which of `model`'s variables are trainable, and their shapes."""
    parts = {"trainable": model.trainable_variables, "frozen": model.non_trainable_variables}
    return tuple((kind, tuple(v.shape), str(v.dtype)) for kind, vs in parts.items() for v in vs)


def prepare(model, batch_shape: tuple, dtype) -> None:
    """Start compiling `model`'s forward pass on batches of `batch_shape`."""
    _prepared["latest"] = Forward(model, batch_shape, dtype)


def prepared(model, batch_size: int) -> Forward | None:
    """The forward pass compiled ahead for `model` and `batch_size`, if one was and it holds;
    it is given up to the caller."""
    forward = _prepared.get("latest")
    if forward is None or forward.model is not model or forward.batch_shape[0] != batch_size:
        return None
    del _prepared["latest"]
    return forward if forward.usable() else None


class CompileAhead(keras.callbacks.Callback):
    """As each `fit` begins, compile the model's forward pass for batches of `batch_size`: the
    one evaluation uses on the test split (`inputs.even_batch_size`). A model of the task's
    images gets them as they are stored (uint8, cast inside the program, as Keras casts them);
    two-stage's head gets the features."""

    def __init__(self, batch_size: int, image_shape: tuple, image_dtype):
        super().__init__()
        self.batch_size = batch_size
        self.image_shape = tuple(image_shape)
        self.image_dtype = image_dtype

    def on_train_begin(self, logs=None):
        model = self.model
        sample = tuple(model.inputs[0].shape[1:])
        dtype = self.image_dtype if sample == self.image_shape else model.inputs[0].dtype
        prepare(model, (self.batch_size, *sample), dtype)


# Batches `predict_in_batches` hands to one `model.predict`: Keras' loop keeps the device busy
# (the next batch is sent while one computes) and copies the model's state back once per call,
# where `predict_on_batch` does both for every batch (on JAX, every weight, every batch: a GPU
# evaluated at 2% of its speed).
CHUNK_BATCHES = 64
# ... but no more outputs at once than this: Keras' predict holds a call's outputs twice (per
# batch, then concatenated), so 64 batches of MobileNetV2's 3 x 3 x 1280 features took 570 MB
# of memory on 16,000 images against 45 MB on 2,000 (where a split is one chunk).
CHUNK_BYTES = 32 * 2**20


def predict_in_batches(model, x, *, batch_size: int, what: str, write) -> None:
    """`model`'s outputs on `x`, a chunk of batches at a time, passed to `write` as numpy arrays.

    Used instead of one `model.predict`, which keeps every output in memory until the end:
    features of a dataset larger than memory go to disk as they come. Every batch has one shape,
    since a compiled backend compiles the model again for each new shape (the base's forward
    pass once more for each split a two-stage run extracts): the batch size is one that divides
    `x` where one near `batch_size` does (`even_batch_size`), else the last batch is filled up
    with zeros and its extra outputs dropped. A progress bar shows on a terminal.
    """
    import math

    import numpy as np

    from experiments.core.progress import progress
    from experiments.data.arrays import release
    from experiments.data.inputs import batches, even_batch_size

    batch_size = even_batch_size(len(x), batch_size)
    row_bytes = 4 * math.prod(d or 1 for d in model.outputs[0].shape[1:])  # float32 outputs
    chunk = batch_size * max(1, min(CHUNK_BATCHES, CHUNK_BYTES // (row_bytes * batch_size)))
    forward = prepared(model, batch_size)  # compiled while the model trained
    with progress(what, len(x)) as advance:
        for start in range(0, len(x), chunk):
            part = x[start : start + chunk]
            data = batches(part, batch_size=batch_size, pad=True)
            if forward is None:
                outputs = np.asarray(model.predict(data, verbose=0))
            else:  # every batch dispatched before the first is read back
                pending = [forward(data[i][0]) for i in range(len(data))]
                outputs = np.concatenate([np.asarray(o) for o in pending])
            write(outputs[: len(part)])
            release(x)
            advance(len(part))
