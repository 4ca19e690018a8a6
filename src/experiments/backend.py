"""The Keras backend, compilation and precision of a run: `backend`, `trainer.jit_compile` and
`trainer.precision`.

Keras reads `KERAS_BACKEND` once, when it is first imported, so `use_backend` runs before
anything imports Keras; nothing on the JAX or PyTorch path imports TensorFlow.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import platform
import sys
from pathlib import Path

from experiments.errors import ExperimentError

log = logging.getLogger(__name__)

# backend -> the package it needs and the extra that installs it
BACKENDS = {
    "tensorflow": ("tensorflow", "pip install -e ."),
    "jax": ("jax", 'pip install -e ".[jax]"'),
    "torch": ("torch", "pip install torch"),
}
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")


def known_backend(name) -> str:
    """`name` as a string, refused unless it is a backend we support."""
    if str(name) not in BACKENDS:
        raise ExperimentError(f"backend={name} is unknown; use one of {', '.join(BACKENDS)}")
    return str(name)


def use_backend(name: str) -> str:
    """Make `name` the Keras backend of this process, before Keras is imported; its name.

    A process that has already imported Keras keeps its backend: asking for another one is an
    error, since Keras cannot switch.
    """
    name = known_backend(name)
    if "keras" in sys.modules:
        current = sys.modules["keras"].backend.backend()
        if current != name:
            raise ExperimentError(
                f"backend={name} was asked, but Keras is already imported with the {current} "
                f"backend in this process; set KERAS_BACKEND={name} before starting Python, or "
                f"run backend={name} in its own process"
            )
        return name
    package, install = BACKENDS[name]
    try:
        found = importlib.util.find_spec(package) is not None
    except ImportError:  # a broken installation is as good as none
        found = False
    if not found:
        raise ExperimentError(
            f"backend={name} needs the {package} package, which is not installed: {install}"
        )
    if name == "tensorflow":
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
    try:  # Keras imports it next: a broken installation is one line here, not a traceback there
        importlib.import_module(package)
    except ImportError as err:
        raise ExperimentError(
            f"backend={name}: importing {package} failed ({err}); repair it: {install}"
        ) from None
    os.environ["KERAS_BACKEND"] = name
    return name


def current_backend() -> str:
    """The backend Keras runs on (importing Keras)."""
    import keras

    return keras.backend.backend()


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


def use_precision(name: str) -> None:
    """Set Keras' global dtype policy. `mixed_float16` scales the loss (Keras wraps the
    optimizer in a `LossScaleOptimizer` at compile); heads keep their output layer float32."""
    import keras

    keras.mixed_precision.set_dtype_policy(str(name))


def device_tags() -> dict[str, str]:
    """The backend, its version and the device a run used ("GPU: <name> x<count>" or
    "CPU: <name> (<cores> cores)"), for MLflow tags."""
    import keras

    backend = keras.backend.backend()
    tags = {"backend": backend, "keras_version": keras.__version__}
    gpus: list[str] = []
    if backend == "jax":
        import jax

        tags["jax_version"] = jax.__version__
        gpus = [d.device_kind for d in jax.devices() if d.platform != "cpu"]
    elif backend == "torch":
        import torch

        tags["torch_version"] = torch.__version__
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    else:
        import tensorflow as tf

        tags["tensorflow_version"] = tf.__version__
        gpus = [
            tf.config.experimental.get_device_details(d).get("device_name", d.name)
            for d in tf.config.list_physical_devices("GPU")
        ]
    if gpus:
        tags["device"] = f"GPU: {gpus[0]} x{len(gpus)}"
    else:
        tags["device"] = f"CPU: {cpu_name()} ({os.cpu_count()} cores)"
    return tags


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
