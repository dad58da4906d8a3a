"""FCN-8s (Long, Shelhamer and Darrell, "Fully convolutional networks for semantic
segmentation", CVPR 2015), trained from scratch beside the U-Net.

A VGG-16 encoder (five blocks of 3x3 convolutions, each ended by a 2x2 max pooling: 2, 2, 3, 3
and 3 convolutions of 1, 2, 4, 8 and 8 times `filters`; the paper's network is filters 64)
and its fully connected layers as convolutions (fc6 7x7 and fc7 1x1, 16 x filters wide here,
64 x in VGG's 4096), scored per class at stride 32. The skip architecture then refines the
coarse score: a 2x up-sampling of it plus a score of pool4 (stride 16), 2x again plus a score of
pool3 (stride 8), and an 8x up-sampling to the input grid. The 2x up-samplings are transposed
convolutions initialised to bilinear interpolation and learned; the final 8x is fixed bilinear
interpolation; the skip scores start at zero, so training begins from FCN-32s (paper section
4.2). `upsampling` "bilinear" or "nearest" replaces the learned 2x steps by fixed resizing.

Unlike the U-Net, every convolution is zero-padded ("same"), so the output has the input's size
and valid inputs are the multiples of 32; tiling takes its context from the receptive field
measured on the built network (`unetcell.receptive`). No ImageNet weights: nothing can be
downloaded here, and microscopy is far from ImageNet.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers

from .config import ModelConfig

# Convolutions and width (times `filters`) of VGG-16's five blocks.
VGG_BLOCKS = ((2, 1), (2, 2), (3, 4), (3, 8), (3, 8))
FC_WIDTH = 16  # fc6 and fc7 channels, times `filters`
STRIDE = 32  # five 2x2 poolings


def bilinear_kernel(size: int, channels: int) -> np.ndarray:
    """The (size, size, channels, channels) transposed-convolution kernel of bilinear
    up-sampling by size // 2, channel to itself (the FCN reference's `upsample_filt`)."""
    factor = (size + 1) // 2
    centre = factor - 1 if size % 2 == 1 else factor - 0.5
    ramp = 1 - np.abs(np.arange(size) - centre) / factor
    kernel = np.zeros((size, size, channels, channels), np.float32)
    for c in range(channels):
        kernel[:, :, c, c] = np.outer(ramp, ramp)
    return kernel


def build_fcn8s(config: ModelConfig | None = None, name: str = "fcn8s") -> keras.Model:
    """FCN-8s from images (any multiple of 32 high and wide) to class probabilities of the
    same size."""
    config = config or ModelConfig(arch="fcn8s")
    f, classes = config.filters, config.classes
    bias = not config.batch_norm

    def conv(x, filters, kernel, layer_name):
        x = layers.Conv2D(filters, kernel, padding="same", kernel_initializer="he_normal",
                          use_bias=bias, name=layer_name)(x)
        if config.batch_norm:
            x = layers.BatchNormalization(name=f"{layer_name}_bn")(x)
        return layers.ReLU(name=f"{layer_name}_relu")(x)

    inputs = keras.Input((None, None, config.channels), name="image")
    x, pools = inputs, []
    for block, (convs, width) in enumerate(VGG_BLOCKS, 1):
        for i in range(1, convs + 1):
            x = conv(x, width * f, 3, f"conv{block}_{i}")
        x = layers.MaxPooling2D(2, name=f"pool{block}")(x)
        pools.append(x)
    x = conv(x, FC_WIDTH * f, 7, "fc6")
    if config.dropout:
        x = layers.Dropout(config.dropout, name="drop6")(x)
    x = conv(x, FC_WIDTH * f, 1, "fc7")
    if config.dropout:
        x = layers.Dropout(config.dropout, name="drop7")(x)

    def score(x, layer_name, initializer):
        return layers.Conv2D(classes, 1, kernel_initializer=initializer, name=layer_name)(x)

    def up(x, factor, layer_name, learned):
        if config.upsampling != "transpose" and factor == 2:
            return layers.UpSampling2D(2, interpolation=config.upsampling, name=layer_name)(x)
        return layers.Conv2DTranspose(classes, 2 * factor, strides=factor, padding="same",
                                      use_bias=False, trainable=learned, name=layer_name)(x)

    x = score(x, "score_fr", "he_normal")
    x = up(x, 2, "upscore2", learned=True)
    x = layers.Add(name="fuse_pool4")([x, score(pools[3], "score_pool4", "zeros")])
    x = up(x, 2, "upscore_pool4", learned=True)
    x = layers.Add(name="fuse_pool3")([x, score(pools[2], "score_pool3", "zeros")])
    x = up(x, 8, "upscore8", learned=False)
    outputs = layers.Softmax(dtype="float32", name="probabilities")(x)
    model = keras.Model(inputs, outputs, name=name)
    for layer in model.layers:
        if isinstance(layer, layers.Conv2DTranspose):
            layer.set_weights([bilinear_kernel(layer.kernel_size[0], classes)])
    return model
