"""The head group: pooling, dense layers and the output layer that fits the class count."""

from __future__ import annotations

from experiments.core.errors import ExperimentError

POOLING = ("flatten", "avg")


def build_head(cfg, feature_shape, num_classes: int):
    """A `keras.Sequential` from the base's feature map to class probabilities.

    Two classes get one sigmoid unit (threshold 0.5); more get a softmax over the classes.
    """
    import keras

    if cfg.pooling not in POOLING:
        raise ExperimentError(f"head.pooling={cfg.pooling!r} is unknown; use one of {POOLING}")
    units = list(cfg.units)
    if any(int(u) < 1 for u in units):
        raise ExperimentError(f"head.units={units} must be positive integers, e.g. [256,128,64]")
    if not 0.0 <= float(cfg.dropout) < 1.0:
        raise ExperimentError(f"head.dropout={cfg.dropout} must be in [0, 1)")
    layers = [keras.Input(tuple(feature_shape))]
    layers.append(
        keras.layers.Flatten()
        if cfg.pooling == "flatten"
        else keras.layers.GlobalAveragePooling2D()
    )
    for i, width in enumerate(units):
        layers.append(keras.layers.Dense(int(width), activation=cfg.activation, name=f"dense_{i}"))
        if cfg.dropout > 0:
            layers.append(keras.layers.Dropout(float(cfg.dropout), name=f"dropout_{i}"))
    # float32 probabilities under a mixed precision policy too (a stable loss)
    if num_classes == 2:
        output = keras.layers.Dense(1, activation="sigmoid", name="output", dtype="float32")
    else:
        output = keras.layers.Dense(
            num_classes, activation="softmax", name="output", dtype="float32"
        )
    layers.append(output)
    return keras.Sequential(layers, name="head")


def loss_for(num_classes: int) -> str:
    """Binary cross-entropy for two classes, sparse categorical cross-entropy otherwise."""
    return "binary_crossentropy" if num_classes == 2 else "sparse_categorical_crossentropy"
