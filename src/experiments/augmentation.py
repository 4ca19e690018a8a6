"""The augmentation group: Keras preprocessing layers, active only while training."""

from __future__ import annotations


def build_augmentation(cfg):
    """A `keras.Sequential` of the configured layers, or None for the `none` preset."""
    import keras
    from hydra.utils import instantiate

    if not cfg.layers:
        return None
    return keras.Sequential(
        [instantiate(layer, _convert_="all") for layer in cfg.layers], name="augmentation"
    )
