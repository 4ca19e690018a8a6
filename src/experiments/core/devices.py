"""The GPU of each job a sweep runs beside others (`hydra.sweeper.n_jobs`), chosen before the
backend is imported."""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)


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


def jobs_sharing_host() -> int:
    """How many jobs of a sweep run on this machine beside this one, itself included (the n of
    its `i/n` slot; 1 outside such a job): each takes its part of the host's memory."""
    slot = os.environ.get(DEVICE_SLOT_ENV, "")
    try:
        return max(1, int(slot.split("/")[1]))
    except (IndexError, ValueError):
        return 1


def jobs_sharing_device() -> int:
    """How many jobs of a sweep share this job's GPU: each takes its part of the memory."""
    return _device_sharing["jobs"]
