"""The forward pass compiled while a model trains: evaluation predicts what Keras' `predict`
would, with the model's current weights, and falls back to `predict` where it does not hold."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from experiments.pipeline.run import train

from helpers import runs_of

pytestmark = pytest.mark.backends  # CI runs these on JAX (make test-jax); they skip elsewhere


@pytest.fixture(autouse=True)
def _jax_only():
    import keras

    if keras.backend.backend() != "jax":
        pytest.skip("the forward pass is compiled ahead on JAX only (make test-jax runs this)")


def _classifier():
    import keras

    inputs = keras.Input((6, 6, 3), dtype="uint8")
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(8, activation="relu", name="hidden")(x)
    x = keras.layers.Dropout(0.5)(x)  # the identity at inference
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))


def test_the_compiled_forward_pass_predicts_as_keras_with_the_current_weights(caplog):
    import keras

    from experiments.model import forward
    from experiments.model.forward import predict_in_batches

    keras.utils.set_random_seed(0)
    model = _classifier()
    x = np.random.default_rng(0).integers(0, 255, (45, 6, 6, 3), dtype=np.uint8)

    def predicted():
        parts = []
        predict_in_batches(model, x, batch_size=16, what="evaluating", write=parts.append)
        return np.concatenate(parts)

    forward.prepare(model, (15, 6, 6, 3), "uint8")  # 45 images go in batches of 15
    assert forward.prepared(model, 16) is None  # another batch size
    assert forward.prepared(_classifier(), 15) is None  # another model
    ahead = predicted()
    assert forward.prepared(model, 15) is None  # given up to that evaluation
    keras_own = model.predict(x, batch_size=15, verbose=0)
    np.testing.assert_allclose(ahead, keras_own, rtol=1e-6, atol=1e-7)

    calls = []
    original = forward.Forward.__call__
    forward.Forward.__call__ = lambda self, batch: calls.append(1) or original(self, batch)
    try:
        # New weights (a restored best epoch): the program takes them as they are now.
        forward.prepare(model, (15, 6, 6, 3), "uint8")
        model.get_layer("hidden").kernel.assign(np.ones((108, 8), np.float32) / 100)
        np.testing.assert_allclose(predicted(), model.predict(x, batch_size=15, verbose=0))
        assert len(calls) == 3
        # Another split of the weights into trainable and frozen: Keras' predict instead.
        forward.prepare(model, (15, 6, 6, 3), "uint8")
        model.get_layer("hidden").trainable = False
        np.testing.assert_allclose(predicted(), model.predict(x, batch_size=15, verbose=0))
        assert len(calls) == 3
    finally:
        forward.Forward.__call__ = original

    # A program that cannot be compiled (here, for images of another size) costs a warning.
    forward.prepare(model, (15, 9, 9, 3), "uint8")
    with caplog.at_level(logging.WARNING, logger="experiments.model.forward"):
        assert forward.prepared(model, 15) is None
    assert "the forward pass compiled ahead failed" in caplog.text


@pytest.mark.parametrize("strategy", ["inline", "two_stage", "fine_tune"])
def test_a_run_that_compiles_ahead_scores_as_one_that_does_not(strategy, make_config, tmp_path):
    """evaluation.compile_ahead=true: the forward pass compiled while training evaluates the
    test split, which scores exactly as Keras' predict scores it (auto: only on a GPU or TPU)."""
    from experiments.data.inputs import even_batch_size
    from experiments.evaluation.reports import EVALUATION_BATCH
    from experiments.model import forward

    assert not forward.compile_ahead("auto")  # CI has no GPU
    calls = []
    original = forward.Forward.__call__

    def counted(self, batch):
        calls.append(batch.shape)
        return original(self, batch)

    scores = {}
    for ahead in ("false", "true"):
        forward.Forward.__call__ = counted
        try:
            cfg = make_config(
                f"strategy={strategy}",
                "trainer.epochs=2",
                *(["strategy.epochs=1"] if strategy == "fine_tune" else []),
                f"evaluation.compile_ahead={ahead}",
                f"tracking.experiment=ahead-{ahead}",
            )
            train(cfg)
        finally:
            forward.Forward.__call__ = original
        (run,) = runs_of(tmp_path, f"ahead-{ahead}")
        scores[ahead] = {k: run.data.metrics[k] for k in ("test_accuracy", "test_loss")}
        assert bool(calls) == (ahead == "true")
    # The test split in the batches evaluation reads (images, or the base's features).
    batch = even_batch_size(int(run.data.metrics["n_test"]), EVALUATION_BATCH)
    assert calls and {shape[0] for shape in calls} == {batch}
    assert scores["true"]["test_accuracy"] == scores["false"]["test_accuracy"]
    assert scores["true"]["test_loss"] == pytest.approx(scores["false"]["test_loss"], rel=1e-5)
