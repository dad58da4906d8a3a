"""The weighted cross-entropy of paper eq. 1."""

import keras
import numpy as np

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


def test_loss_round_trips_through_its_config():
    loss = WeightedCrossEntropy(name="w")
    again = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(again, WeightedCrossEntropy) and again.name == "w"


def test_foreground_counts():
    truth = np.array([[[1, 1, 0, 0]]], np.float32)
    probs = np.zeros((1, 1, 4, 2), np.float32)
    probs[..., 1] = [[0.9, 0.2, 0.7, 0.1]]
    packed = pack_targets(truth, np.ones_like(truth))
    inter, union, correct, total = (float(v) for v in foreground_counts(packed, probs))
    assert (inter, union, correct, total) == (1.0, 3.0, 2.0, 4.0)
