"""The paper's loss (section 3, eq. 1) and the measures watched during training.

The energy is a pixel-wise softmax over the final feature map combined with the cross-entropy,
weighted per pixel by the weight map w(x) of eq. 2 (`unetcell.targets.weight_map`).
"""

from __future__ import annotations

import keras
from keras import ops


def pack_targets(classes, weights):
    """One target tensor [..., 2] from the class map and the weight map.

    Keras losses take one y_true; packing keeps the weights aligned with their pixels through
    batching, distribution and any later crop.
    """
    return ops.stack([ops.cast(classes, "float32"), ops.cast(weights, "float32")], axis=-1)


@keras.saving.register_keras_serializable(package="unetcell")
class WeightedCrossEntropy(keras.losses.Loss):
    """Cross-entropy of the softmax probabilities, weighted per pixel (paper eq. 1).

    y_true: [batch, h, w, 2], the class index and the pixel's weight (`pack_targets`).
    y_pred: [batch, h, w, classes], softmax probabilities (the U-Net's output).
    The value is the weighted mean over pixels; with all weights 1 it equals Keras'
    sparse categorical cross-entropy.
    """

    def __init__(self, name="weighted_cross_entropy", reduction="sum_over_batch_size", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)

    def call(self, y_true, y_pred):
        return pixel_losses(y_true, y_pred)

    def get_config(self):
        return super().get_config()


def pixel_losses(y_true, y_pred):
    """Per-pixel weighted cross-entropy, [batch, h, w]: what a distributed step sums."""
    classes = ops.cast(y_true[..., 0], "int32")
    weights = y_true[..., 1]
    return weights * keras.losses.sparse_categorical_crossentropy(classes, y_pred)


def foreground_counts(y_true, y_pred, threshold: float = 0.5):
    """(intersection, union, correct, total) pixel counts of the foreground class, summed over
    a batch: pooled over validation tiles they give the foreground IoU and pixel accuracy."""
    truth = y_true[..., 0] > 0.5
    predicted = y_pred[..., 1] > threshold
    count = lambda x: ops.sum(ops.cast(x, "float32"))  # noqa: E731
    return (
        count(ops.logical_and(truth, predicted)),
        count(ops.logical_or(truth, predicted)),
        count(ops.equal(truth, predicted)),
        ops.cast(ops.size(truth), "float32"),
    )
