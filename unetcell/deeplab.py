"""DeepLabv3+ (Chen, Zhu, Papandreou, Schroff and Adam, "Encoder-decoder with atrous separable
convolution for semantic image segmentation", ECCV 2018), trained from scratch beside the
U-Net, at a width that follows `filters`.

- Encoder (a small Xception-like network; the paper's is Xception-65 or ResNet-101 with
  ImageNet weights, which cannot be downloaded here): two 3x3 convolutions at stride 2, then
  residual blocks of depthwise separable convolutions, each block's last at stride 2, to output
  stride 16; the low-level features for the decoder are taken at stride 4. The last block
  keeps stride 16 and dilates its convolutions by 2 instead (atrous convolution: a larger
  field of view without losing resolution).
- ASPP at output stride 16: a 1x1 convolution, three 3x3 separable convolutions at rates 6, 12
  and 18, and image-level pooling (see below), concatenated and projected by a 1x1 convolution.
- Decoder: the ASPP features up-sampled bilinearly to stride 4, concatenated with a 1x1
  projection of the low-level features (a few channels, 48 of 256 in the paper), two 3x3
  separable convolutions, the classifier, and bilinear up-sampling by 4 to the input grid.

Output stride 8 (`depth` 3; 16 is `depth` 4, the default): as in the paper, the last two
blocks keep the resolution and dilate instead (rates 2 and 4), and every atrous rate after them
doubles (ASPP 12, 24 and 36), so the field of view in input pixels is the same at twice the
feature resolution, for about four times the multiply-adds from the third block on.

Image-level pooling. The paper averages the features over the whole image, so every output
pixel depends on every input pixel and tiled prediction of a slide could never equal one pass
over it. The reference implementation meets the same problem on images larger than its
training crop and pools over a window of the crop size instead (`image_pooling_crop_size`).
unetcell does that in training and prediction alike: the average over a window of
IMAGE_POOL_WINDOW x IMAGE_POOL_WINDOW feature pixels (496 input pixels; 63 x 63 at output
stride 8, 504), padding excluded, which is exactly the whole-image average on training tiles up
to POOLED_TILE pixels. The network is then local, its receptive field is measured like FCN's
(`unetcell.receptive`) and tiling is exact.

All convolutions are zero-padded: valid inputs are the multiples of the output stride and the
output has the input's size. Bilinear up-sampling needs static shapes
(`unetcell.tiling.needs_static_shapes`).
"""

from __future__ import annotations

import keras
from keras import layers

from .config import ModelConfig

OUTPUT_STRIDE = 16  # the default; 8 with `depth` 3
ASPP_RATES = (6, 12, 18)  # at output stride 16; doubled at 8
# The training tile whose whole-image average the image-level pooling reproduces.
POOLED_TILE = 256


def image_pool_window(stride: int) -> int:
    """Feature pixels averaged by the image-level pooling: 2 * (POOLED_TILE / stride) - 1
    covers every feature pixel of a POOLED_TILE training tile from every position."""
    return 2 * (POOLED_TILE // stride) - 1


IMAGE_POOL_WINDOW = image_pool_window(OUTPUT_STRIDE)  # 31


def build_deeplabv3plus(config: ModelConfig | None = None, name: str = "deeplabv3plus") -> keras.Model:
    """DeepLabv3+ from images (any multiple of the output stride 2**depth, 16 or 8, high and
    wide) to class probabilities of the same size. Widths: encoder 1, 2, 4, 8 x filters; ASPP
    and decoder 8 x filters; low-level projection 3 x filters / 2 (48 of 256, the paper's
    ratio)."""
    config = config or ModelConfig(arch="deeplabv3plus")
    f = config.filters
    stride = 2**config.depth  # 16 or 8 (ModelConfig refuses others)
    atrous = OUTPUT_STRIDE // stride  # 1 at stride 16, 2 at 8: the factor of every rate
    bias = not config.batch_norm

    def finish(x, layer_name, relu=True):
        if config.batch_norm:
            x = layers.BatchNormalization(name=f"{layer_name}_bn")(x)
        return layers.ReLU(name=f"{layer_name}_relu")(x) if relu else x

    def conv(x, filters, kernel, layer_name, strides=1):
        x = layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=bias,
                          kernel_initializer="he_normal", name=layer_name)(x)
        return finish(x, layer_name)

    def sepconv(x, filters, layer_name, strides=1, rate=1, relu=True):
        x = layers.SeparableConv2D(filters, 3, strides=strides, dilation_rate=rate, padding="same",
                                   use_bias=bias, depthwise_initializer="he_normal",
                                   pointwise_initializer="he_normal", name=layer_name)(x)
        return finish(x, layer_name, relu)

    def block(x, filters, layer_name, strides=1, rate=1):
        """Xception's residual block: three separable convolutions, the last strided (or
        dilated), beside a 1x1 shortcut."""
        shortcut = layers.Conv2D(filters, 1, strides=strides, padding="same", use_bias=bias,
                                 kernel_initializer="he_normal", name=f"{layer_name}_shortcut")(x)
        y = sepconv(x, filters, f"{layer_name}_sep1", rate=rate)
        y = sepconv(y, filters, f"{layer_name}_sep2", rate=rate)
        y = sepconv(y, filters, f"{layer_name}_sep3", strides=strides, rate=rate, relu=False)
        return layers.ReLU(name=f"{layer_name}_relu")(layers.Add(name=f"{layer_name}_add")([y, shortcut]))

    inputs = keras.Input((None, None, config.channels), name="image")
    x = conv(inputs, f, 3, "entry_conv1", strides=2)  # stride 2
    x = conv(x, f, 3, "entry_conv2")
    low_level = x = block(x, 2 * f, "block1", strides=2)  # stride 4
    x = block(x, 4 * f, "block2", strides=2)  # stride 8
    if atrous == 1:
        x = block(x, 8 * f, "block3", strides=2)  # stride 16
    else:
        x = block(x, 8 * f, "block3", rate=atrous)  # atrous: stride 8 kept
    x = block(x, 8 * f, "block4", rate=2 * atrous)  # atrous: the output stride kept

    width = 8 * f
    branches = [conv(x, width, 1, "aspp_1x1")]
    branches += [sepconv(x, width, f"aspp_rate{atrous * rate}", rate=atrous * rate) for rate in ASPP_RATES]
    pooled = layers.AveragePooling2D(image_pool_window(stride), strides=1, padding="same", name="aspp_pool")(x)
    branches.append(conv(pooled, width, 1, "aspp_pool_conv"))
    x = layers.Concatenate(name="aspp_concat")(branches)
    x = conv(x, width, 1, "aspp_project")
    if config.dropout:
        x = layers.Dropout(config.dropout, name="aspp_dropout")(x)

    # To the low-level features' stride 4 (`Geometry.of_model` reads the stride from it).
    x = layers.UpSampling2D(stride // 4, interpolation="bilinear", name="decoder_upsample")(x)
    low = conv(low_level, max(1, 3 * f // 2), 1, "decoder_low_level")
    x = layers.Concatenate(name="decoder_concat")([x, low])
    x = sepconv(x, width, "decoder_sep1")
    x = sepconv(x, width, "decoder_sep2")
    x = layers.Conv2D(config.classes, 1, kernel_initializer="he_normal", name="classifier")(x)
    x = layers.UpSampling2D(4, interpolation="bilinear", name="upsample")(x)
    outputs = layers.Softmax(dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=name)
