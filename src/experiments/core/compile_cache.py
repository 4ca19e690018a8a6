"""The persistent compilation cache (`trainer.compilation_cache`): compiled steps kept on disk,
and how often a run found them there."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)


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


def count_jax_cache_events() -> None:
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


# JAX's stages of making a program (jax.monitoring duration events): tracing to a jaxpr,
# lowering to MLIR, and XLA's compile, or the persistent cache's read where it hits.
COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_compile_seconds: list[float] = []  # [total] once listening


def time_jax_compiles() -> None:
    """Add up the seconds JAX spends making programs (`COMPILE_EVENTS`), once a process."""
    if _compile_seconds:
        return
    import jax

    _compile_seconds.append(0.0)

    def listen(event: str, duration: float, **kwargs) -> None:
        if event in COMPILE_EVENTS:
            _compile_seconds[0] += duration

    jax.monitoring.register_event_duration_secs_listener(listen)


def jax_compile_seconds() -> float | None:
    """Seconds JAX has spent making programs in this process; None when it is not counted (the
    backend is not JAX)."""
    return _compile_seconds[0] if _compile_seconds else None


def compilation_cache_counts(reset: bool = False) -> dict[str, int]:
    """Hits and misses of the persistent compilation cache since the last reset; {} where the
    backend keeps no count (TensorFlow)."""
    if not _cache_counts.get("listening"):
        return {}
    counts = {"hits": _cache_counts["hits"], "misses": _cache_counts["misses"]}
    if reset:
        _cache_counts["hits"] = _cache_counts["misses"] = 0
    return counts
