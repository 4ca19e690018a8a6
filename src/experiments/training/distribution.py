"""One run on several devices of this host, data-parallel (`trainer.devices`): Keras 3's
`keras.distribution.DataParallel` on JAX (XLA SPMD), not a loop of our own.

The parameters are replicated on every device and each batch is split across them on the
`batch` axis; `trainer.batch_size` stays the global batch, so the learning rate means what it
meant on one device (the README says how to scale it with the batch). Every batch the run makes
is a multiple of the devices (`data.inputs.devices_per_batch`). The distribution is Keras'
global setting, so it is set here, after the backend is imported and before any model is built,
and set back to none for a run on one device in the same process.
"""

from __future__ import annotations

import logging

from experiments.core.errors import ExperimentError

log = logging.getLogger(__name__)


def use_devices(setting, batch_size: int) -> list:
    """Split each batch across the devices `trainer.devices=setting` asks for (`auto`: all of
    this host's accelerators, or its CPU devices without one); the devices, one for a run on
    one device. One line, before any data is loaded, for more devices than there are or a
    global batch they do not divide."""
    import keras

    keras.distribution.set_distribution(None)  # an earlier run of this process may have set it
    if str(setting) == "1":
        return [None]
    import jax

    present = jax.devices()
    wanted = len(present) if str(setting) == "auto" else int(setting)
    if wanted > len(present):
        raise ExperimentError(
            f"trainer.devices={setting}, but this host has {len(present)} {present[0].platform} "
            f"device(s) ({', '.join(str(d) for d in present)}); use trainer.devices="
            f"{len(present)} or auto"
        )
    devices = present[:wanted]
    if batch_size % wanted:
        raise ExperimentError(
            f"trainer.batch_size={batch_size} does not split evenly across trainer.devices="
            f"{setting} ({wanted} devices); use a multiple of {wanted}, e.g. "
            f"trainer.batch_size={(batch_size // wanted + 1) * wanted}"
        )
    if wanted > 1:
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
        log.info(
            "data-parallel over %d devices (%s): %d images a device per batch of %d",
            wanted,
            ", ".join(str(d) for d in devices),
            batch_size // wanted,
            batch_size,
        )
    return devices


def distribution_tags(devices: list, batch_size: int) -> dict[str, str]:
    """What a run records of its devices: how many, the batch each takes, and the mesh."""
    count = len(devices)
    tags = {"devices": str(count), "per_device_batch": str(batch_size // count)}
    if count > 1:
        tags["mesh"] = f"batch={count}: " + ", ".join(str(d) for d in devices)
    return tags
