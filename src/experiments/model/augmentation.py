"""The augmentation group: Keras preprocessing layers, active only while training.

Keras 3.15 marks `RandomRotation`, `RandomZoom`, `RandomTranslation` and `RandomCrop`
`supports_jit=False`, and `compile()` then runs the whole train step of a model that holds one
uncompiled: no XLA on TensorFlow, no jit on JAX, 64 to 100 times slower on a GPU. Their op on
TensorFlow, `ImageProjectiveTransformV3`, has no XLA kernel, and `keras.ops.image.map_coordinates`
interpolates along every axis of a batch (16 gathers where a 2-D warp needs 4). No library layer
warps a batch with a compilable op, so `RandomAffine` does it with `keras.ops` alone: rotation,
zoom and translation as one bilinear warp with reflected borders, drawn anew for every image of
every step, the identity at inference.

This module imports Keras: import it only after the backend is chosen (`experiments.core.backend`).
"""

from __future__ import annotations

import logging
import math

import keras
from keras import ops

log = logging.getLogger(__name__)


def build_augmentation(cfg):
    """A `keras.Sequential` of the configured layers, or None for the `none` preset."""
    from hydra.utils import instantiate

    if not cfg.layers:
        return None
    layers = [instantiate(layer, _convert_="all") for layer in cfg.layers]
    slow = [type(layer).__name__ for layer in layers if not layer.supports_jit]
    if slow:
        log.warning(
            "augmentation=%s: Keras' %s cannot be compiled, so the whole train step runs "
            "uncompiled (up to 100x slower on a GPU); use "
            "experiments.model.augmentation.RandomAffine (rotation, zoom, translation) instead",
            cfg.name,
            ", ".join(slow),
        )
    return keras.Sequential(layers, name="augmentation")


def _bounds(value, name: str) -> tuple[float, float]:
    """Keras' factor convention: x means (-x, x); a pair is (lower, upper)."""
    low, high = (
        (-float(value), float(value)) if isinstance(value, int | float) else map(float, value)
    )
    if low > high:
        raise ValueError(f"RandomAffine {name}={value}: the lower bound exceeds the upper one")
    return low, high


@keras.saving.register_keras_serializable(package="experiments")
class RandomAffine(keras.layers.Layer):
    """Random rotation, zoom and translation of a batch of images in one bilinear warp.

    The factors mean what they mean in Keras' own layers, as a float `x` for the range
    `(-x, x)` or as a `(lower, upper)` pair:
      - `rotation`: a fraction of a full turn, as `RandomRotation(factor)`: 0.2 is +-72 degrees;
        positive turns counter-clockwise;
      - `zoom`: as `RandomZoom(height_factor)`: 0.4 scales by 0.6 to 1.4, positive zooms out;
        `width_zoom` draws the width's zoom separately, None keeps the aspect ratio;
      - `translation`: as `RandomTranslation(height_factor, width_factor)`, a fraction of the
        height and of the width: 0.1 shifts by up to 10% each way.
    Borders are filled by reflection (`fill_mode="reflect"`, d c b a | a b c d | d c b a) and
    pixels sampled bilinearly. Images are channels-last.
    """

    def __init__(
        self,
        rotation=0.0,
        zoom=0.0,
        translation=0.0,
        width_zoom=None,
        fill_mode: str = "reflect",
        interpolation: str = "bilinear",
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if fill_mode != "reflect" or interpolation != "bilinear":
            raise ValueError(
                f"RandomAffine supports fill_mode='reflect' and interpolation='bilinear' "
                f"(got {fill_mode!r}, {interpolation!r})"
            )
        self.rotation = _bounds(rotation, "rotation")
        self.zoom = _bounds(zoom, "zoom")
        self.width_zoom = None if width_zoom is None else _bounds(width_zoom, "width_zoom")
        self.translation = _bounds(translation, "translation")
        self.fill_mode, self.interpolation, self.seed = fill_mode, interpolation, seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.supports_masking = True

    def call(self, images, training=True):
        if not training:
            return images
        shape = ops.shape(images)
        batch = shape[0]

        def draw(bounds):
            return keras.random.uniform(
                (batch, 1, 1), bounds[0], bounds[1], seed=self.seed_generator
            )

        angle = draw(self.rotation) * (2.0 * math.pi)
        zoom_y = 1.0 + draw(self.zoom)
        zoom_x = zoom_y if self.width_zoom is None else 1.0 + draw(self.width_zoom)
        shift_y, shift_x = draw(self.translation), draw(self.translation)
        return affine_warp(images, angle, zoom_y, zoom_x, shift_y, shift_x)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return super().get_config() | {
            "rotation": list(self.rotation),
            "zoom": list(self.zoom),
            "width_zoom": None if self.width_zoom is None else list(self.width_zoom),
            "translation": list(self.translation),
            "fill_mode": self.fill_mode,
            "interpolation": self.interpolation,
            "seed": self.seed,
        }


def affine_warp(images, angle, zoom_y, zoom_x, shift_y, shift_x):
    """Warp a (batch, height, width, channels) batch; every parameter has shape (batch, 1, 1).

    Output pixel p reads the input at c + R(angle) Z (p - c) - shift * size, c the centre: the
    inverse map, so that a zoom above 1 shows more of the image (zooms out) and a positive
    angle turns the content counter-clockwise on screen (rows grow downwards).
    """
    shape = ops.shape(images)
    batch, height, width, channels = shape[0], shape[1], shape[2], shape[3]
    h, w = ops.cast(height, "float32"), ops.cast(width, "float32")
    rows = ops.arange(height, dtype="float32")[None, :, None] - (h - 1.0) / 2.0
    cols = ops.arange(width, dtype="float32")[None, None, :] - (w - 1.0) / 2.0
    cos, sin = ops.cos(angle), ops.sin(angle)
    y = cos * zoom_y * rows + sin * zoom_x * cols + (h - 1.0) / 2.0 - shift_y * h
    x = -sin * zoom_y * rows + cos * zoom_x * cols + (w - 1.0) / 2.0 - shift_x * w

    y0, x0 = ops.floor(y), ops.floor(x)
    wy, wx = y - y0, x - x0  # (batch, height, width) bilinear weights
    y0, x0 = ops.cast(y0, "int32"), ops.cast(x0, "int32")
    y0, y1 = _reflect(y0, height), _reflect(y0 + 1, height)
    x0, x1 = _reflect(x0, width), _reflect(x0 + 1, width)

    # Gather whole pixels (all channels at once) from the flattened batch.
    flat = ops.reshape(images, (-1, channels))
    base = (ops.arange(batch, dtype="int32") * (height * width))[:, None, None]

    def pixels(yi, xi):
        return ops.take(flat, ops.reshape(base + yi * width + xi, (-1,)), axis=0)

    dtype = images.dtype
    wy = ops.cast(ops.reshape(wy, (-1, 1)), dtype)
    wx = ops.cast(ops.reshape(wx, (-1, 1)), dtype)
    top = pixels(y0, x0) * (1 - wx) + pixels(y0, x1) * wx
    bottom = pixels(y1, x0) * (1 - wx) + pixels(y1, x1) * wx
    return ops.reshape(top * (1 - wy) + bottom * wy, shape)


def _reflect(index, size):
    """Integer indices folded into [0, size) by half-sample reflection (scipy's 'reflect')."""
    period = ops.mod(index, 2 * size)
    return ops.where(period < size, period, 2 * size - 1 - period)


def augmented_views(augmentation, images):
    """`images` (a float32 batch) through `augmentation` in training mode, as numpy, in one
    compiled call. Called eagerly, each of the warp's ops compiles on its own on JAX: 1.4 s for
    nine 180 px views on this project's CPU, against 0.3 s compiled, which a warm compilation
    cache keeps."""
    model = keras.Sequential([keras.Input(images.shape[1:]), _Training(augmentation)])
    return model.predict(images, batch_size=len(images), verbose=0)


class _Training(keras.layers.Layer):
    """Calls `layer` in training mode, also where Keras calls for inference (`predict`)."""

    def __init__(self, layer, **kwargs):
        super().__init__(**kwargs)
        self.layer = layer

    def call(self, inputs):
        return self.layer(inputs, training=True)


def without_augmentation(model):
    """`model` with its augmentation replaced by the identity, sharing every weight.

    Augmentation is the identity at inference, so the result predicts exactly as `model` does;
    it holds Keras' own layers only, so a logged model loads with Keras alone, without this
    package (MLflow's pyfunc, serving).
    """
    if not any(layer.name == "augmentation" for layer in model.layers):
        return model

    def keep(layer):
        if layer.name != "augmentation":
            return layer
        # A Sequential, as the augmentation is, since the graph calls it with a mask argument.
        return keras.Sequential([keras.layers.Identity()], name=layer.name)

    return keras.models.clone_model(model, clone_function=keep)
