"""The logged model as MLflow serves it: a Keras flavor, and a pyfunc flavor that answers with
class names and probabilities.

A run's `model/` is MLflow's Keras model (`mlflow.keras.load_model` gives the Keras model back)
whose pyfunc flavor is this module rather than `mlflow.keras`: `mlflow.pyfunc.load_model` and
`mlflow models serve` take uint8 images and return, per image, the predicted class's name, its
probability and every class's probability by name, in the class names the run recorded. The
names travel inside the model (`data/classes.json`), so a served model needs no run store.

The pyfunc flavor imports this package, so the model is served from an environment that has it
installed: `python -m experiments.serve MODEL` (`make serve MODEL=...`), which also takes
encoded images and refuses pixel values that are not integers from 0 to 255 (`serving_app`), or
`mlflow models serve -m ... --env-manager local` with the project's virtualenv activated.
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


# What a client may send to `python -m experiments.serve` beside MLflow's own JSON: encoded
# images, decoded as training decodes them (EXIF orientation, 16-bit, alpha) and resized.
IMAGES_KEY = "images"


def serving_app(model_uri: str):
    """MLflow's scoring server (`/invocations`, `/ping`, `/health`, `/version`) for the model at
    `model_uri`, behind `ImagesAndPixels`: it also takes `{"images": [base64 PNG or JPEG, ...]}`,
    and refuses pixel values that are not integers from 0 to 255 (MLflow casts 1.5 to 1 and
    300 to 44 without a word)."""
    import mlflow.pyfunc
    from mlflow.pyfunc import scoring_server

    model = mlflow.pyfunc.load_model(model_uri)
    shape = model.metadata.get_input_schema().inputs[0].shape  # (-1, height, width, 3)
    return ImagesAndPixels(scoring_server.init(model), (int(shape[1]), int(shape[2])))


class ImagesAndPixels:
    """An ASGI middleware in front of MLflow's scoring app, for `/invocations` in JSON.

    Written here because MLflow's server checks a request against the model's signature (uint8
    tensors of the model's size) and nothing more: encoded images cannot pass it, and a float
    or out-of-range value is cast. The request is read whole, turned into MLflow's `inputs`
    form or refused with a 400 in MLflow's error format, and passed on.
    """

    def __init__(self, app, size: tuple[int, int]):
        self.app, self.size = app, size

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/invocations":
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        try:
            body = self.rewritten(body)
        except ValueError as err:
            return await refuse(send, str(err))

        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    def rewritten(self, body: bytes) -> bytes:
        """The request as MLflow takes it; ValueError with what is wrong."""
        try:
            payload = json.loads(body)
        except ValueError:
            return body  # MLflow answers malformed JSON itself
        if not isinstance(payload, dict):
            return body
        if IMAGES_KEY in payload:
            return json.dumps({"inputs": self.decoded(payload[IMAGES_KEY]).tolist()}).encode()
        for key in ("inputs", "instances"):
            if key in payload:
                check_pixels(payload[key], self.size)
        return body

    def decoded(self, images) -> np.ndarray:
        import base64
        import binascii
        import io

        from experiments.data.decoding import decode_image

        if not isinstance(images, list) or not images:
            raise ValueError(f'"{IMAGES_KEY}" must be a list of base64-encoded PNG or JPEG files')
        decoded = []
        for i, text in enumerate(images):
            try:
                raw = base64.b64decode(text, validate=True)
            except (binascii.Error, TypeError, ValueError):
                raise ValueError(f"{IMAGES_KEY}[{i}] is not base64 text") from None
            image = decode_image(io.BytesIO(raw), self.size)
            if image is None:
                raise ValueError(f"{IMAGES_KEY}[{i}] is not a decodable image (PNG, JPEG, ...)")
            decoded.append(image.image)
        return np.stack(decoded)


def check_pixels(values, size: tuple[int, int]) -> None:
    """ValueError unless `values` (nested lists, or a dict of them) are images of `size` (h, w)
    whose every number is an integer from 0 to 255; anything else is left to MLflow's checks."""
    for value in values.values() if isinstance(values, dict) else [values]:
        try:
            array = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            continue  # ragged, or text: MLflow says what is wrong with it
        if array.size == 0:
            continue
        if array.ndim == 4 and array.shape[1:3] != size:
            raise ValueError(
                f"the model takes {size[0]} x {size[1]} x 3 images; got {array.shape[1]} x "
                f"{array.shape[2]} x {array.shape[3]}. Resize them, or send encoded images, "
                f'which are resized: {{"{IMAGES_KEY}": [base64 PNG or JPEG, ...]}}'
            )
        bad = array[~np.isfinite(array) | (array != np.round(array)) | (array < 0) | (array > 255)]
        if bad.size:
            raise ValueError(
                f"pixel values must be integers from 0 to 255; found {bad.flat[0]:g}. Send uint8 "
                f'arrays of the model\'s size, or encoded images: {{"{IMAGES_KEY}": [base64 PNG '
                f"or JPEG, ...]}}"
            )


async def refuse(send, message: str) -> None:
    """A 400 in MLflow's error format."""
    body = json.dumps({"error_code": "BAD_REQUEST", "message": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 400, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def run(app, host: str, port: int) -> None:
    """Serve `app` until the process is stopped (uvicorn, as `mlflow models serve` runs it)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning")
