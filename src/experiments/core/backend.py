"""The Keras backend of a run (`backend`), its precision (`trainer.precision`), the start-up
chatter it prints, and the device tags it records. Where a job's GPU and compiled programs go
is in `devices` and `compile_cache`; compiling the train step, in `experiments.training`.

Keras reads `KERAS_BACKEND` once, when it is first imported, so `use_backend` runs before
anything imports Keras; nothing on the JAX or PyTorch path imports TensorFlow.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import platform
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from experiments.core.compile_cache import count_jax_cache_events, time_jax_compiles
from experiments.core.devices import visible_gpus
from experiments.core.errors import ExperimentError

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
        if name == "jax":  # a later run in this process (a sweep's job, a test)
            time_jax_compiles()
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
        with stderr_without(start_up_chatter()):
            module = importlib.import_module(package)
            if name == "tensorflow":  # the CUDA driver is looked for here, not mid-run
                module.config.list_physical_devices("GPU")
                logging.getLogger("tensorflow").addFilter(_not_retracing)
                # tf.data notes a memory setting at its first generator, whenever that comes:
                # it comes here, inside the filter.
                for _ in module.data.Dataset.from_generator(
                    lambda: iter([0]), output_signature=module.TensorSpec((), module.int32)
                ):
                    pass
    except ImportError as err:
        raise ExperimentError(
            f"backend={name}: importing {package} failed ({err}); repair it: {install}"
        ) from None
    os.environ["KERAS_BACKEND"] = name
    if name == "jax":
        count_jax_cache_events()
        time_jax_compiles()
        # JAX logs at INFO each platform it could not start ("Unable to initialize backend
        # 'tpu'"), which reads as an error on any machine without a TPU.
        logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    return name


@contextmanager
def tensorflow_left_unimported() -> Iterator[None]:
    """On a backend other than TensorFlow, Keras does not import TensorFlow inside the block,
    installed or not: importing it cost a JAX run 2-4 s of this CPU, and its memory.

    Keras imports it on any backend for two things it does only where TensorFlow is installed:
    seeding TensorFlow's random ops (`set_random_seed`) and recognizing TensorFlow's shapes,
    dtypes and type specs as it serializes a model. A process that has not imported TensorFlow
    needs neither: it holds no TensorFlow object and draws no TensorFlow random number. Keras
    asks `keras.src.utils.module_utils.tensorflow.available`, which imports TensorFlow to
    answer; inside the block it answers False, as where TensorFlow is not installed (a JAX run
    is tested whole there). Keras has no public setting for this, hence its private attribute,
    left alone if a later Keras has none. A block on TensorFlow, or in a process that imported
    it already, changes nothing.
    """
    import keras
    from keras.src.utils import module_utils

    lazy = getattr(module_utils, "tensorflow", None)
    if (
        keras.backend.backend() == "tensorflow"
        or "tensorflow" in sys.modules
        or getattr(lazy, "_available", True) is not None  # answered already, or another Keras
    ):
        yield
        return
    lazy._available = False
    try:
        yield
    finally:
        lazy._available = None  # asked again, it looks again


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and the backend (Keras' `set_random_seed`), and TensorFlow's random ops
    where Keras imports it for that (on TensorFlow, or another backend outside
    `tensorflow_left_unimported`), filtering its start-up lines."""
    import keras

    with stderr_without(start_up_chatter()):
        keras.utils.set_random_seed(int(seed))


def start_up_chatter() -> re.Pattern:
    """The lines TensorFlow's C++ start-up writes that do not concern the user: absl writes
    every message before its InitializeLog, whatever TF_CPP_MIN_LOG_LEVEL says (the CPU kernels
    it uses, a machine without CUDA, tf.data's memory setting). Without a GPU, the failed CUDA
    start is chatter too; with one, it is the news that the GPU is not used, and stays."""
    chatter = [
        "All log messages before absl::InitializeLog",
        "oneDNN custom operations are on",
        "Could not find cuda drivers on your machine",
        "Memory patch applied",
    ]
    if not visible_gpus():
        chatter += ["failed call to cuInit", "cuda_executor.cc", "cuda_platform.cc"]
    return re.compile("|".join(re.escape(c) for c in chatter))


def _not_retracing(record: logging.LogRecord) -> bool:
    """False for TensorFlow's retracing warning: each job of a sweep builds its model anew, and
    TensorFlow counts the new model's traces of the same Keras step as retracing in a loop."""
    return "triggered tf.function retracing" not in record.getMessage()


@contextmanager
def stderr_without(chatter: re.Pattern) -> Iterator[None]:
    """The process's stderr (file descriptor 2, where C++ libraries write), less the lines
    matching `chatter`, for the duration of the block."""
    sys.stderr.flush()
    kept = os.dup(2)
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)

    def pass_on() -> None:
        with os.fdopen(read, "rb") as lines:
            for line in lines:
                if not chatter.search(line.decode(errors="replace")):
                    os.write(kept, line)

    reader = threading.Thread(target=pass_on, name="stderr-filter", daemon=True)
    reader.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(kept, 2)  # the pipe's last writer closes: the reader sees its end
        reader.join(timeout=10)
        os.close(kept)


def current_backend() -> str:
    """The backend Keras runs on (importing Keras)."""
    import keras

    return keras.backend.backend()


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
