"""RandomAffine: Keras' rotation, zoom and translation, as one warp that compiles."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import compose_config, tiny_overrides

pytestmark = pytest.mark.backends  # CI runs these on JAX as well (make test-jax)


def test_the_warp_is_bilinear_with_reflected_borders():
    """Exactly scipy's map_coordinates(order=1, mode='reflect') at the same source points."""
    from scipy import ndimage

    from experiments.model.augmentation import affine_warp

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (2, 17, 23, 3)).astype("float32")

    def column(*values):
        return np.array(values, "float32").reshape(-1, 1, 1)

    angle, zoom_y, zoom_x = column(0.3, -1.1), column(1.3, 0.7), column(1.3, 0.9)
    shift_y, shift_x = column(0.05, -0.1), column(-0.02, 0.1)
    out = np.asarray(affine_warp(images, angle, zoom_y, zoom_x, shift_y, shift_x))
    h, w = 17, 23
    rows, cols = np.arange(h)[:, None] - (h - 1) / 2, np.arange(w)[None, :] - (w - 1) / 2
    for b in range(2):
        cos, sin = np.cos(angle[b]), np.sin(angle[b])
        y = cos * zoom_y[b] * rows + sin * zoom_x[b] * cols + (h - 1) / 2 - shift_y[b] * h
        x = -sin * zoom_y[b] * rows + cos * zoom_x[b] * cols + (w - 1) / 2 - shift_x[b] * w
        for c in range(3):
            expected = ndimage.map_coordinates(
                images[b, :, :, c].astype("float64"), [y, x], order=1, mode="reflect"
            )
            np.testing.assert_allclose(out[b, :, :, c], expected, atol=2e-3)


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        ({"rotation": (0.1, 0.1)}, ("RandomRotation", {"factor": (0.1, 0.1)})),
        ({"rotation": (-0.2, -0.2)}, ("RandomRotation", {"factor": (-0.2, -0.2)})),
        ({"zoom": (0.4, 0.4)}, ("RandomZoom", {"height_factor": (0.4, 0.4)})),
        ({"zoom": (-0.3, -0.3)}, ("RandomZoom", {"height_factor": (-0.3, -0.3)})),
        (
            {"translation": (0.1, 0.1)},
            ("RandomTranslation", {"height_factor": (0.1, 0.1), "width_factor": (0.1, 0.1)}),
        ),
    ],
)
def test_factors_mean_what_they_mean_in_keras_layers(ours, theirs):
    """At a fixed draw, RandomAffine moves pixels where Keras' own layer does (interior: the
    border pixels of Keras' layers reflect the coordinate, ours the pixel grid)."""
    import keras

    from experiments.model.augmentation import RandomAffine

    images = np.random.default_rng(1).uniform(0, 255, (1, 32, 32, 3)).astype("float32")
    name, kwargs = theirs
    expected = np.asarray(getattr(keras.layers, name)(**kwargs, fill_mode="reflect")(images))
    got = np.asarray(RandomAffine(**ours)(images, training=True))
    np.testing.assert_allclose(got[0, 6:-6, 6:-6], expected[0, 6:-6, 6:-6], atol=1e-2)


def test_ranges_are_keras_conventions():
    from experiments.model.augmentation import RandomAffine

    layer = RandomAffine(rotation=0.2, zoom=0.4, translation=(0.0, 0.1))
    assert layer.rotation == (-0.2, 0.2)  # +-72 degrees
    assert layer.zoom == (-0.4, 0.4)  # scales 0.6 to 1.4
    assert layer.translation == (0.0, 0.1)
    with pytest.raises(ValueError, match="lower bound"):
        RandomAffine(zoom=(0.3, 0.1))


def test_identity_at_inference_and_a_new_draw_per_image_and_per_step():
    import keras

    from experiments.model.augmentation import RandomAffine

    images = np.random.default_rng(2).uniform(0, 255, (4, 24, 24, 3)).astype("float32")
    images[1:] = images[0]  # four copies of one image
    layer = RandomAffine(rotation=0.2, zoom=0.4)
    assert np.array_equal(np.asarray(layer(images, training=False)), images)

    # Inside a compiled train step too: a model whose loss is its own output sees a new draw at
    # every step, and a different one for each copy of the image.
    inputs = keras.Input((24, 24, 3))
    model = keras.Model(inputs, layer(inputs))
    model.compile(loss="mae", jit_compile=True)
    first = np.asarray(model(images, training=True))
    second = np.asarray(model(images, training=True))
    assert np.abs(first[0] - first[1]).mean() > 1.0
    assert np.abs(first - second).mean() > 1.0
    assert model.jit_compile


def test_the_augmented_views_report_shows_training_draws(monkeypatch):
    """The report's views go through the augmentation in training mode, in one compiled call:
    never the eager one, whose every op compiles on its own on JAX."""
    import keras

    from experiments.model.augmentation import augmented_views, build_augmentation

    augmentation = build_augmentation(compose_config(["augmentation=reference"]).augmentation)
    eager = keras.Sequential.__call__

    def traced(x) -> bool:
        if keras.backend.is_keras_tensor(x) or keras.backend.backend() == "torch":
            return True
        if keras.backend.backend() == "jax":
            import jax

            return isinstance(x, jax.core.Tracer)
        import tensorflow as tf

        return not tf.executing_eagerly()

    def refuse_eager(self, *args, **kwargs):
        if self is augmentation and not traced(args[0]):
            raise AssertionError("the augmentation ran eagerly")
        return eager(self, *args, **kwargs)

    monkeypatch.setattr(keras.Sequential, "__call__", refuse_eager)
    images = np.repeat(
        np.random.default_rng(3).uniform(0, 255, (1, 32, 32, 3)).astype("float32"), 9, axis=0
    )
    views = augmented_views(augmentation, images)
    assert views.shape == images.shape and np.isfinite(views).all()
    assert all(np.abs(view - images[0]).mean() > 1.0 for view in views)  # each one drawn
    assert np.abs(views[0] - views[1]).mean() > 1.0  # and drawn anew


@pytest.mark.parametrize("augmentation", ["reference", "strong"])
@pytest.mark.parametrize("strategy", ["inline", "fine_tune"])
def test_training_compiles_with_augmentation(augmentation, strategy, tmp_path, image_folder):
    """The train step of every strategy that augments compiles (XLA on TensorFlow, jit on JAX),
    also once fine-tuning has unfrozen the top blocks; the inline one trains compiled."""
    from experiments.data.tasks import load_task
    from experiments.model.backbones import build_backbone, unfreeze_top_blocks
    from experiments.model.heads import build_head
    from experiments.training.checkpoints import RunCheckpoints
    from experiments.training.strategies import (
        Context,
        assemble,
        compile_model,
        fit,
        images_dataset,
    )

    cfg = compose_config(
        [
            *tiny_overrides(tmp_path, image_folder),
            f"augmentation={augmentation}",
            f"strategy={strategy}",
            "trainer.jit_compile=true",
            "trainer.epochs=1",
            "task.image_size=[48,48]",  # XLA's CPU convolutions crawl on VGG's 2x2 maps at 32
        ]
    )
    task = load_task(cfg.task, cfg.paths)
    base, preprocess = build_backbone(cfg.backbone, task.image_shape, None)
    ctx = Context(cfg, task, base, preprocess, tmp_path, "random", RunCheckpoints(tmp_path / "c"))
    model = assemble(ctx, build_head(cfg.head, base.output.shape[1:], task.num_classes))
    compile_model(ctx, model)
    assert model.jit_compile
    if strategy == "fine_tune":
        unfreeze_top_blocks(base, list(cfg.backbone.blocks), 2)
        compile_model(ctx, model, lr=1e-5)
        assert model.jit_compile
    elif augmentation == "reference":
        history = fit(ctx, model, images_dataset(ctx, "train"), images_dataset(ctx, "val"))
        assert model.jit_compile and np.isfinite(history["loss"]).all()


def test_keras_layers_that_cannot_compile_are_named_in_a_warning(caplog):
    from omegaconf import OmegaConf

    from experiments.model.augmentation import build_augmentation

    cfg = OmegaConf.create(
        {"name": "mine", "layers": [{"_target_": "keras.layers.RandomRotation", "factor": 0.1}]}
    )
    build_augmentation(cfg)
    assert "RandomRotation cannot be compiled" in caplog.text
    assert "experiments.model.augmentation.RandomAffine" in caplog.text
