"""A Keras model written for serving outside Keras (a TensorFlow SavedModel or ONNX), and
checked to predict what the model predicts."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np

from experiments.core.errors import ExperimentError

# Our name -> Keras' name, and the backends where Keras can write it.
FORMATS = {
    "saved_model": ("tf_saved_model", ("tensorflow", "jax")),
    "onnx": ("onnx", ("tensorflow", "jax", "torch")),
}
CHECK_IMAGES = 16
# Exported graphs reorder float32 arithmetic; a probability may move by a few ulps.
TOLERANCE = 1e-4


def export(model, fmt: str, output: Path, backbone_module: str | None = None) -> None:
    """Write `model` to `output` in `fmt` with Keras; an exporter that is missing is one line.
    ONNX is written from the model rebuilt with its backbone's preprocessing in a layer
    (`preprocessing_in_a_layer`, given `backbone_module`, e.g. "vgg16")."""
    from experiments.core.backend import start_up_chatter, stderr_without

    keras_format, _ = FORMATS[fmt]
    if fmt == "onnx" and backbone_module:
        model = preprocessing_in_a_layer(model, backbone_module)
    model(np.zeros((1, *model.input_shape[1:]), "float32"))  # JAX's exporters need a call
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        # On JAX, the SavedModel exporter imports TensorFlow here: its start-up lines are chatter;
        # so is Keras' copy of tf2onnx asking numpy for `np.object`.
        with stderr_without(start_up_chatter()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*np.object.*", category=FutureWarning)
            model.export(str(output), format=keras_format, verbose=False)
    except ImportError as err:
        raise ExperimentError(
            f"--format {fmt} needs a package this environment lacks: {err}; or use --format "
            f"saved_model"
        ) from None


def preprocessing_in_a_layer(model, backbone_module: str):
    """The same model, image -> preprocess_input -> base -> head, with the backbone's
    `preprocess_input` run inside one layer's call.

    Our models apply it to the symbolic input (`training.strategies.assemble`), so the graph
    holds its constants (VGG's and ResNet's mean pixel) as captured tensors, which tf2onnx
    turns into a second input of the ONNX model. Inside a layer's call they are constants of
    the traced graph; so are the base's Normalization statistics (`normalization_as_constants`).
    Augmentation layers, inactive at inference, are left out; the weights are the model's own
    (its base and head layers, not copies). A model of another layout is one line. The parity
    check after the export compares it with the logged model."""
    import importlib

    import keras

    base, head = (model.layers[-2], model.layers[-1]) if len(model.layers) >= 3 else (None, None)
    if not isinstance(base, keras.Model) or not isinstance(head, keras.Model):
        raise ExperimentError(
            "--format onnx: the model is not image -> preprocessing -> base -> head as this "
            "project builds it; use --format saved_model"
        )
    preprocess = importlib.import_module(f"keras.applications.{backbone_module}").preprocess_input

    class Preprocessing(keras.layers.Layer):
        def call(self, images):
            return preprocess(images)

    normalization_as_constants(base)
    inputs = keras.Input(model.input_shape[1:], name="image")
    outputs = head(base(Preprocessing(name="preprocessing")(inputs), training=False))
    return keras.Model(inputs, outputs, name=model.name)


def normalization_as_constants(model) -> None:
    """Keras' Normalization layers (EfficientNet's, inside the base) hold their mean and
    variance as tensors made at build time, which a traced graph captures and tf2onnx turns
    into inputs; as numpy arrays of the same values they become constants of the graph. The
    model predicts as before (the parity check compares it with itself unchanged otherwise)."""
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.Model):
            normalization_as_constants(layer)
        elif isinstance(layer, keras.layers.Normalization) and layer.mean is not None:
            layer.mean = keras.ops.convert_to_numpy(layer.mean)
            layer.variance = keras.ops.convert_to_numpy(layer.variance)


def exported_predict(path: Path, fmt: str):
    """A function of float32 images to the exported model's outputs."""
    if fmt == "saved_model":
        import tensorflow as tf

        # A JAX export holds no gradients, and the check asks for none: absl's warning that
        # they were not saved is not news.
        logging.getLogger("absl").addFilter(
            lambda record: "unsaved custom gradients" not in record.getMessage()
        )
        loaded = tf.saved_model.load(str(path))
        return lambda images: np.asarray(loaded.serve(tf.constant(images)))
    try:
        import onnxruntime
    except ImportError:
        raise ExperimentError(
            "checking an ONNX export needs onnxruntime: pip install onnxruntime"
        ) from None
    session = onnxruntime.InferenceSession(str(path))
    inputs = [i.name for i in session.get_inputs()]
    if len(inputs) != 1:
        raise ExperimentError(
            f"the ONNX exporter gave a model of {len(inputs)} inputs ({', '.join(inputs)}), not "
            f"one image input; nothing written: use --format saved_model"
        )
    return lambda images: session.run(None, {inputs[0]: images})[0]


def check(model, predict, images: np.ndarray) -> float:
    """The largest difference between the exported and the logged model's outputs on `images`;
    one line if they differ beyond `TOLERANCE` or in any predicted class."""
    logged = model.predict(images, verbose=0)
    exported = np.asarray(predict(images.astype("float32"))).reshape(logged.shape)
    gap = float(np.abs(exported - logged).max())
    same_class = np.array_equal(exported.argmax(axis=1), logged.argmax(axis=1))
    if gap > TOLERANCE or (logged.shape[1] > 1 and not same_class):
        raise ExperimentError(
            f"the export predicts other probabilities than the logged model (largest "
            f"difference {gap:.3g} on {len(images)} images); nothing written"
        )
    return gap
