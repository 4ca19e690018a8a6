"""The logged model as MLflow serves it: a Keras flavor, and a pyfunc flavor that answers with
class names and probabilities.

A run's `model/` is MLflow's Keras model (`mlflow.keras.load_model` gives the Keras model back)
whose pyfunc flavor is this module rather than `mlflow.keras`: `mlflow.pyfunc.load_model` and
`mlflow models serve` take uint8 images and return, per image, the predicted class's name, its
probability and every class's probability by name, in the class names the run recorded. The
names travel inside the model (`data/classes.json`), so a served model needs no run store.

The pyfunc flavor imports this package, so the model is served from an environment that has it
installed: `mlflow models serve -m ... --env-manager local` in the project's virtualenv.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# In the model's data/ folder, beside MLflow's Keras file.
CLASSES_FILE = "classes.json"


def signature(image_shape):
    """uint8 images of `image_shape` in; per image its class, confidence and probabilities out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema, TensorSpec
    from mlflow.types.schema import Map

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, *image_shape), "image")]),
        outputs=Schema(
            [
                ColSpec(DataType.string, "class"),
                ColSpec(DataType.double, "confidence"),
                ColSpec(Map(DataType.double), "probabilities"),
            ]
        ),
    )


def save_model(path, mlflow_model=None, *, keras_model, class_names, **keras_spec) -> int:
    """Save `keras_model` in MLflow's Keras format at `path`, with `class_names` and this
    module as its pyfunc loader; the size of the Keras file in bytes. `mlflow.models.Model.log`
    calls it as a flavor's save_model."""
    import mlflow.keras
    from mlflow.models import Model

    mlflow_model = mlflow_model or Model()
    mlflow.keras.save_model(keras_model, str(path), mlflow_model=mlflow_model, **keras_spec)
    data = Path(path) / mlflow_model.flavors["keras"]["data"]
    (data / CLASSES_FILE).write_text(json.dumps({"class_names": list(class_names)}, indent=2))
    mlflow_model.flavors["python_function"]["loader_module"] = __name__
    mlflow_model.save(str(Path(path) / "MLmodel"))
    return sum(f.stat().st_size for f in data.glob("*.keras"))


def log_model(keras_model, class_names, **keras_spec) -> int:
    """Log the model of the active run under `model/`, as `mlflow.keras.log_model` would; the
    size of its Keras file in bytes (measured as it is saved, so the model is saved once)."""
    from types import SimpleNamespace

    from mlflow.models import Model

    sizes = []
    # MLflow calls a flavor's save_model and keeps no return value: this one keeps the size.
    flavor = SimpleNamespace(save_model=lambda **kwargs: sizes.append(save_model(**kwargs)))
    Model.log(
        artifact_path=None,
        name="model",
        flavor=flavor,
        flavor_name="keras",
        keras_model=keras_model,
        class_names=class_names,
        **keras_spec,
    )
    return sizes[0]


class ImageClassifier:
    """What `mlflow.pyfunc.load_model` wraps: uint8 images to class names and probabilities."""

    def __init__(self, model, class_names: list[str]):
        self.model = model
        self.class_names = list(class_names)

    def predict(self, data, params=None):
        """A frame of one row per image: `class`, `confidence` and `probabilities` by name."""
        import pandas as pd

        from experiments.evaluation.calibration import class_probabilities

        # MLflow has checked the images against the signature (uint8, the model's shape); a
        # request of named inputs arrives as a dict.
        images = np.asarray(data["image"] if isinstance(data, dict) else data)
        outputs = self.model.predict(images, batch_size=64, verbose=0)
        probabilities = class_probabilities(outputs)
        best = probabilities.argmax(axis=1)
        return pd.DataFrame(
            {
                "class": [self.class_names[i] for i in best],
                "confidence": probabilities[np.arange(len(best)), best],
                "probabilities": [
                    dict(zip(self.class_names, row.tolist(), strict=True)) for row in probabilities
                ],
            }
        )


def _load_pyfunc(path: str) -> ImageClassifier:
    """MLflow's hook for the pyfunc flavor: `path` is the model's local folder."""
    import mlflow.keras
    from mlflow.models import Model

    root = Path(path)
    data = root / Model.load(str(root / "MLmodel")).flavors["keras"]["data"]
    names = json.loads((data / CLASSES_FILE).read_text())["class_names"]
    model = mlflow.keras.load_model(str(root))
    return ImageClassifier(model, names)
