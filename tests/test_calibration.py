"""Calibrated probabilities: the class-balance term of the loss (paper eq. 2's w_c) shifts the
network's foreground logit by log(w_fg / w_bg); training measures that shift on the masks and
predict and the SavedModel divide it out (targets.balance_shift, tiling.calibrated)."""

import math

import numpy as np
import pytest
import tensorflow as tf
from conftest import bright_cells_probability, save_bright_cells_unet

from unetcell.export import FOREGROUND, serving_module
from unetcell.model import load_model, save_model
from unetcell.normalize import normalize
from unetcell.predict import load_predictor
from unetcell.targets import balance_shift, class_weights
from unetcell.tiling import calibrated


def _mask(shape, foreground_pixels, seed=0):
    mask = np.zeros(shape, np.int32)
    flat = np.random.default_rng(seed).choice(mask.size, foreground_pixels, replace=False)
    mask.flat[flat] = 1 + np.arange(foreground_pixels) % 7
    return mask


def _log_ratio(mask, balance):
    weights = class_weights(mask, balance)
    return math.log(float(weights[mask != 0][0]) / float(weights[mask == 0][0]))


def test_balance_shift_is_the_log_ratio_of_the_class_weights_per_pixel():
    sparse, dense = _mask((40, 50), 300), _mask((20, 20), 300, seed=1)  # 15 % and 75 % foreground
    for balance in (0.5, 1.0):
        assert balance_shift([sparse], balance) == pytest.approx(_log_ratio(sparse, balance), abs=1e-6)
        assert balance_shift([sparse], balance) > 0 > balance_shift([dense], balance)
        # Each image its own weights, averaged over every pixel; an image of one class adds 0.
        empty = np.zeros((10, 30), np.int32)
        expected = (2000 * _log_ratio(sparse, balance) + 400 * _log_ratio(dense, balance)) / 2700
        assert balance_shift([sparse, dense, empty], balance) == pytest.approx(expected, abs=1e-6)
    assert balance_shift([sparse], 0.0) == 0.0
    assert balance_shift([], 0.5) == 0.0


def test_calibrated_gives_back_the_true_probability_from_the_weighted_loss_optimum():
    # The probability p that minimises the expected weighted cross-entropy of a pixel that is
    # foreground with probability q, found by brute force over a fine grid of p.
    w_fg, w_bg = 2.7, 0.6
    grid = np.linspace(1e-6, 1 - 1e-6, 400001)
    q = np.array([0.02, 0.2, 0.5, 0.8, 0.97])
    loss = -(w_fg * q[:, None] * np.log(grid) + w_bg * (1 - q[:, None]) * np.log(1 - grid))
    learned = grid[np.argmin(loss, axis=1)]
    assert np.all(learned > q)  # the class term pushed foreground up
    two_classes = np.stack([1 - learned, learned], axis=-1).astype(np.float32)
    back = calibrated(tf.constant(two_classes), math.log(w_fg / w_bg)).numpy()
    np.testing.assert_allclose(back[:, 1], q, atol=1e-4)
    np.testing.assert_allclose(back.sum(axis=-1), 1, atol=1e-6)


def test_calibrated_classes_keep_the_foreground_classes_ratios():
    probabilities = tf.nn.softmax(tf.random.stateless_normal((6, 5, 3), seed=(1, 2))).numpy()
    out = calibrated(tf.constant(probabilities), -0.8).numpy()
    np.testing.assert_allclose(out.sum(axis=-1), 1, atol=1e-6)
    np.testing.assert_allclose(out[..., 2] / out[..., 1], probabilities[..., 2] / probabilities[..., 1], rtol=1e-5)
    odds = (1 - out[..., 0]) / out[..., 0]
    np.testing.assert_allclose(odds, (1 - probabilities[..., 0]) / probabilities[..., 0] * math.exp(0.8), rtol=1e-5)
    assert calibrated(probabilities, 0.0) is probabilities


def test_predict_and_the_served_graph_divide_the_saved_shift_out(tmp_path):
    steepness, shift = 20.0, 0.9
    plain = save_bright_cells_unet(tmp_path / "plain.keras", steepness=steepness)
    model, config = load_model(plain)
    shifted = save_model(model, tmp_path / "shifted.keras", config.override("predict", balance_shift=shift))
    image = np.random.default_rng(0).random((45, 70)).astype(np.float32)
    normalised = normalize(image[..., None], config.normalize)[..., 0]

    predictor = load_predictor(shifted)
    got = predictor.probabilities(image)
    # sigmoid(steepness (x - level) - shift): the stand-in's answer with its level moved.
    want = bright_cells_probability(normalised, steepness, 0.5 + shift / steepness)
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert np.abs(got - load_predictor(plain).probabilities(image)).max() > 0.1

    served = serving_module(predictor.model, predictor.config).serve(tf.constant(image[None, ..., None]))
    np.testing.assert_allclose(served[FOREGROUND].numpy()[0], got, atol=1e-5)
