"""The weighted cross-entropy of paper eq. 1."""

import keras
import numpy as np
import pytest

from unetcell.losses import WeightedCrossEntropy, foreground_counts, pack_targets


def _probabilities(rng, shape):
    logits = rng.normal(size=shape).astype(np.float32)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_unit_weights_equal_keras_sparse_categorical_crossentropy():
    rng = np.random.default_rng(0)
    probs = _probabilities(rng, (2, 9, 11, 2))
    classes = rng.integers(0, 2, (2, 9, 11))
    ours = WeightedCrossEntropy()(pack_targets(classes, np.ones((2, 9, 11))), probs)
    reference = keras.losses.SparseCategoricalCrossentropy()(classes, probs)
    np.testing.assert_allclose(float(ours), float(reference), rtol=1e-6)


def test_weights_scale_each_pixel():
    rng = np.random.default_rng(1)
    probs = _probabilities(rng, (1, 5, 6, 3))
    classes = rng.integers(0, 3, (1, 5, 6))
    weights = rng.uniform(0, 10, (1, 5, 6))
    expected = np.mean(weights * -np.log(np.take_along_axis(probs, classes[..., None], -1)[..., 0]))
    ours = float(WeightedCrossEntropy()(pack_targets(classes, weights), probs))
    np.testing.assert_allclose(ours, expected, rtol=1e-5)


def numpy_energy(classes, weights, probabilities):
    """Paper eq. 1 in plain numpy: -sum over pixels of w(x) log p_l(x)(x), divided by the
    number of pixels (probabilities renormalised and clipped to [1e-7, 1 - 1e-7] as Keras'
    cross-entropy does)."""
    p = probabilities.astype(np.float64)
    p = p / p.sum(-1, keepdims=True)
    true_class = np.take_along_axis(p, classes[..., None], -1)[..., 0]
    true_class = np.clip(true_class, 1e-7, 1 - 1e-7)
    return -np.sum(weights * np.log(true_class)) / classes.size


def test_loss_on_eq2_weights_equals_a_numpy_eq1():
    """A batch of two tiles whose weights are the paper's eq. 2 weight map of touching cells
    (the border term by brute force in numpy, as in test_targets), and fixed probabilities."""
    from test_targets import balanced_class_term, brute_force_border, random_blobs

    from unetcell.targets import carve_gaps

    rng = np.random.default_rng(4)
    classes, weights = [], []
    for seed in (0, 1):
        carved = carve_gaps(random_blobs((40, 40), 8, seed), 1)
        classes.append((carved != 0).astype(np.int64))
        weights.append(balanced_class_term(carved, 0.5) + brute_force_border(carved, 10.0, 5.0))
    classes, weights = np.stack(classes), np.stack(weights)
    assert weights.max() > 5  # the border term is there
    probs = _probabilities(rng, (2, 40, 40, 2))
    ours = float(WeightedCrossEntropy()(pack_targets(classes, weights), probs))
    np.testing.assert_allclose(ours, numpy_energy(classes, weights, probs), rtol=1e-6)
    # call: the unreduced per-pixel values, whose sum validation pools over batches.
    per_pixel = WeightedCrossEntropy().call(pack_targets(classes, weights), probs)
    assert tuple(per_pixel.shape) == (2, 40, 40)
    np.testing.assert_allclose(float(keras.ops.sum(per_pixel)),
                               numpy_energy(classes, weights, probs) * classes.size, rtol=1e-6)


def test_reduction_is_the_one_asked_for():
    rng = np.random.default_rng(2)
    probs = _probabilities(rng, (2, 4, 5, 2))
    classes = rng.integers(0, 2, (2, 4, 5))
    weights = rng.uniform(1, 3, (2, 4, 5))
    packed = pack_targets(classes, weights)
    expected = numpy_energy(classes, weights, probs)
    np.testing.assert_allclose(float(WeightedCrossEntropy(reduction="sum")(packed, probs)),
                               expected * classes.size, rtol=1e-6)
    none = WeightedCrossEntropy(reduction="none")(packed, probs)
    assert tuple(none.shape) == (2, 4, 5)


def test_loss_round_trips_through_its_config():
    loss = WeightedCrossEntropy(name="w", reduction="sum", dtype="float64")
    config = loss.get_config()
    assert config == {"name": "w", "reduction": "sum", "dtype": "float64"}
    again = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(again, WeightedCrossEntropy)
    assert (again.name, again.reduction, again.dtype) == ("w", "sum", "float64")
    assert again.get_config() == config


@pytest.mark.slow  # one training step
def test_training_steps_call_the_compiled_loss(monkeypatch):
    """The loop's loss is the loss object compiled into the model (and saved with it)."""
    from unetcell.config import Config
    from unetcell.train import Trainer

    config = Config().override("model", filters=2, depth=1).override("train", tile=44)
    trainer = Trainer(config)
    assert trainer.loss is trainer.model.loss and isinstance(trainer.loss, WeightedCrossEntropy)
    calls = []
    original = WeightedCrossEntropy.call
    monkeypatch.setattr(WeightedCrossEntropy, "call", lambda self, *a: calls.append(1) or original(self, *a))
    rng = np.random.default_rng(3)
    out = trainer.geometry.output
    images = rng.uniform(size=(1, trainer.geometry.input, trainer.geometry.input, 1)).astype(np.float32)
    packed = pack_targets(rng.integers(0, 2, (1, out, out)), rng.uniform(1, 3, (1, out, out)))
    loss = float(trainer.train_step(images, packed))
    assert calls and np.isfinite(loss)


def test_foreground_counts():
    truth = np.array([[[1, 1, 0, 0]]], np.float32)
    probs = np.zeros((1, 1, 4, 2), np.float32)
    probs[..., 1] = [[0.9, 0.2, 0.7, 0.1]]
    packed = pack_targets(truth, np.ones_like(truth))
    inter, union, correct, total = (float(v) for v in foreground_counts(packed, probs))
    assert (inter, union, correct, total) == (1.0, 3.0, 2.0, 4.0)
