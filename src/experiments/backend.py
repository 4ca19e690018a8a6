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
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
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
        _count_jax_cache_events()
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


# Every compiled program goes to the persistent cache, however short its compile (JAX's default
# keeps those over 1 s): building a model runs one initializer program per weight shape, each
# compiled in 0.1-0.15 s on this CPU, and a run of MobileNetV2 compiled them again every time
# (3.5 s of its 8.4 s of building); read back from the disk, a small one loads in milliseconds.
MIN_CACHED_COMPILE_S = 0
_cache_counts = {"hits": 0, "misses": 0}


def use_compilation_cache(cfg) -> Path | None:
    """Keep compiled steps on disk under `paths.cache_dir/compiled/<backend>-<version>/`, so that
    the same experiment run again, or the next trial of a sweep, does not compile them again;
    None when `trainer.compilation_cache` is off or the backend keeps none.

    Set before the backend is imported, through its own settings: JAX's persistent compilation
    cache and TensorFlow's XLA cache (used where XLA compiles). Each keys an entry by the
    compiled program, its options and the device, and the folder by the backend's version, so
    an entry built for another config is never used; an unreadable entry is compiled again.
    Settings the user made in the environment win.
    """
    from importlib.metadata import PackageNotFoundError, version

    backend = str(cfg.backend)
    if not cfg.trainer.get("compilation_cache", True) or backend not in ("jax", "tensorflow"):
        return None
    try:
        release = version("jaxlib" if backend == "jax" else "tensorflow")
    except PackageNotFoundError:
        release = "unknown"
    path = Path(str(cfg.paths.cache_dir)) / "compiled" / f"{backend}-{release}"
    path.mkdir(parents=True, exist_ok=True)
    if backend == "jax":
        os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(path))
        os.environ.setdefault(
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", str(MIN_CACHED_COMPILE_S)
        )
        if "jax" in sys.modules:  # a later job of a sweep: JAX read the environment already
            import jax

            jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    else:
        flags = os.environ.get("TF_XLA_FLAGS", "")
        if "tf_xla_persistent_cache_directory" not in flags:
            os.environ["TF_XLA_FLAGS"] = f"{flags} --tf_xla_persistent_cache_directory={path}"
    return path


def _count_jax_cache_events() -> None:
    """Count JAX's persistent-cache hits and misses (jax.monitoring events), once a process."""
    if _cache_counts.get("listening") or not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    import jax

    def listen(event: str, **kwargs) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            _cache_counts["hits"] += 1
        elif event == "/jax/compilation_cache/cache_misses":
            _cache_counts["misses"] += 1

    jax.monitoring.register_event_listener(listen)
    _cache_counts["listening"] = 1


def compilation_cache_counts(reset: bool = False) -> dict[str, int]:
    """Hits and misses of the persistent compilation cache since the last reset; {} where the
    backend keeps no count (TensorFlow)."""
    if not _cache_counts.get("listening"):
        return {}
    counts = {"hits": _cache_counts["hits"], "misses": _cache_counts["misses"]}
    if reset:
        _cache_counts["hits"] = _cache_counts["misses"] = 0
    return counts


# "i/n": this job is the i-th of n that a sweep runs at the same time (hydra.sweeper.n_jobs).
DEVICE_SLOT_ENV = "EXPERIMENTS_DEVICE_SLOT"
# How many of those jobs share this process's GPU (`use_device_slot`), 1 outside them.
_device_sharing = {"jobs": 1}


def visible_gpus() -> list[str]:
    """The ids of the NVIDIA GPUs this process may use, without importing a framework:
    `CUDA_VISIBLE_DEVICES` when set, else those `nvidia-smi -L` lists; [] without any."""
    import shutil
    import subprocess

    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [d for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip() != ""]
    if not shutil.which("nvidia-smi"):
        return []
    try:
        listing = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(listing.splitlines()) if line.startswith("GPU ")]


def use_device_slot() -> str | None:
    """For a job run beside others: a GPU of its own (the i-th of n jobs takes GPU i modulo the
    GPUs there are), and memory taken as needed, so that jobs sharing a GPU do not each grab
    all of it (JAX preallocates 75% of every GPU it sees, TensorFlow all of it). The GPU id,
    or None outside such a job or without a GPU. Runs before the backend is imported.
    """
    _device_sharing["jobs"] = 1
    slot = os.environ.get(DEVICE_SLOT_ENV)
    if not slot:
        return None
    index, jobs = (int(part) for part in slot.split("/"))
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    gpus = visible_gpus()
    if not gpus:
        return None
    gpu = gpus[index % len(gpus)]
    _device_sharing["jobs"] = len(range(index % len(gpus), jobs, len(gpus)))
    if "jax" in sys.modules:  # a worker process reused from an earlier job: choose by default
        import jax

        devices = [d for d in jax.devices() if d.platform != "cpu"]
        if devices:
            jax.config.update("jax_default_device", devices[index % len(devices)])
    elif any(name in sys.modules for name in ("tensorflow", "torch")):
        log.warning(
            "job %s runs in a process that already chose its GPUs (a reused worker): it may "
            "share a GPU with another job",
            slot,
        )
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    log.info("job %s of the sweep's parallel jobs runs on GPU %s", slot, gpu)
    return gpu


def jobs_sharing_device() -> int:
    """How many jobs of a sweep share this job's GPU: each takes its part of the memory."""
    return _device_sharing["jobs"]


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
