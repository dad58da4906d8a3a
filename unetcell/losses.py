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
    """The paper's energy (section 3, eq. 1): cross-entropy of the softmax probabilities,
    each pixel weighted by the weight map w(x) of eq. 2.

    Formula:

    ```python
    loss = -sum(w(x) * log(p_l(x)(x))) / pixels
    ```

    The sum runs over every pixel x of every tile in the batch; `l(x)` is the pixel's true
    class and `p_l(x)(x)` its softmax probability, clipped to [1e-7, 1 - 1e-7] as Keras'
    cross-entropy clips it. With the default `reduction="sum_over_batch_size"` the sum is
    divided by the number of pixels, batch x height x width, and under a `tf.distribute`
    strategy Keras divides it once more by the number of replicas, so each replica's share
    adds up to the sum over the global batch / the global number of pixels: the same gradient
    on any number of replicas. It is a sum divided by a pixel count, not a weighted mean (the
    weights are not the divisor); with all weights 1 it equals
    `keras.losses.SparseCategoricalCrossentropy`.

    `call` returns the unreduced per-pixel values [batch, h, w], which validation sums over
    all its tiles before dividing by their pixel count.

    Args:
        name: the loss's name.
        reduction: how `__call__` reduces the per-pixel values, as for any Keras loss; the
            training loop needs the default.
        dtype: the dtype of the loss's computations (default float32, also under mixed
            precision: the U-Net's softmax is float32).

    y_true: [batch, h, w, 2], the class index and the pixel's weight (`pack_targets`).
    y_pred: [batch, h, w, classes], softmax probabilities (the U-Net's output).
    """

    def __init__(self, name="weighted_cross_entropy", reduction="sum_over_batch_size", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)

    def call(self, y_true, y_pred):
        classes = ops.cast(y_true[..., 0], "int32")
        weights = y_true[..., 1]
        return weights * keras.losses.sparse_categorical_crossentropy(classes, y_pred)

    def get_config(self):
        # Keras' Loss.get_config leaves out the dtype, which its __init__ takes.
        return {**super().get_config(), "dtype": self.dtype}


def foreground_counts(y_true, y_pred, threshold: float = 0.5):
    """(intersection, union, correct, total) pixel counts of the foreground class, summed over
    a batch: pooled over validation tiles they give the foreground IoU and pixel accuracy."""
    truth = y_true[..., 0] > 0.5
    predicted = ops.sum(y_pred[..., 1:], axis=-1) > threshold  # every class but background
    count = lambda x: ops.sum(ops.cast(x, "float32"))  # noqa: E731
    return (
        count(ops.logical_and(truth, predicted)),
        count(ops.logical_or(truth, predicted)),
        count(ops.equal(truth, predicted)),
        ops.cast(ops.size(truth), "float32"),
    )
