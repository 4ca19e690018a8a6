"""Shared fixtures: generated image folders and tiny composed configs writing under tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# XLA's CPU convolutions take 0.4 s for one 3x3 convolution of a 2x2 map, VGG's block 5 at
# 32 px: on JAX, whose every step is compiled by XLA, tiny runs use 48 px (block 5 at 3x3).
IMAGE_SIZE = 48 if os.environ.get("KERAS_BACKEND") == "jax" else 32

PALETTE = [(200, 40, 40), (40, 180, 40), (40, 60, 200), (200, 200, 40)]


def write_class_folders(
    root: Path, classes: int = 3, per_class: int = 24, size: int = 40, seed: int = 0
) -> Path:
    """Noisy images whose class is their dominant colour: learnable from random conv features."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noise = rng.normal(0, 35, (size, size, 3))
            pixels = np.clip(np.array(PALETTE[c]) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"img_{i}.png")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """Three learnable classes of 24 images each."""
    return write_class_folders(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="session")
def binary_folder(tmp_path_factory) -> Path:
    """Two learnable classes of 24 images each."""
    return write_class_folders(tmp_path_factory.mktemp("binary"), classes=2)


@pytest.fixture(autouse=True)
def _no_tracking_env(monkeypatch):
    # mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI, which the config honours; clear it
    # before every test and every module-scoped fixture, or runs land in another test's store.
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    monkeypatch.delenv("EXPERIMENTS_MLFLOW_PARENT_RUN_ID", raising=False)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def tiny_overrides(root: Path, folder: Path | None = None) -> list[str]:
    """Overrides that make a run tiny and keep every output under `root`."""
    task = ["task=folder", f"task.path={folder}"] if folder else []
    return [
        f"paths.root_dir={root}",
        f"paths.keras_home={root}/keras",
        *task,
        f"task.image_size=[{IMAGE_SIZE},{IMAGE_SIZE}]",
        "backbone=vgg16",
        "backbone.weights=null",
        "augmentation=none",
        "head.units=[32]",
        "optimizer.lr=3e-3",
        "trainer.epochs=3",
        "trainer.batch_size=8",
    ]


def compose_config(overrides: list[str]):
    """The config composed from conf/ with `overrides`, as the entry point would see it."""
    from experiments import compose_project_config

    return compose_project_config(overrides)


@pytest.fixture
def make_config(tmp_path, image_folder):
    """Compose a tiny config on the 3-class image folder, with extra overrides."""

    def make(*overrides: str, folder: Path | None = None):
        return compose_config([*tiny_overrides(tmp_path, folder or image_folder), *overrides])

    return make
