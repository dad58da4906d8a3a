"""Shared fixtures: small synthetic datasets made by the tests themselves."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

from unetcell.synth import write_dataset  # noqa: E402


@pytest.fixture(scope="session")
def synth_folder(tmp_path_factory):
    """Four 128 x 128 synthetic images with instance masks."""
    folder = tmp_path_factory.mktemp("synth")
    write_dataset(folder, count=4, shape=(128, 128), seed=3)
    return folder


def save_bright_cells_unet(path, steepness: float = 50.0, level: float = 0.5):
    """Save a stand-in for a trained U-Net whose answer is known: the foreground probability
    of a pixel is sigmoid(steepness * (x - level)) of its normalised intensity x, so bright
    cells on a dark background come out as themselves. It has a U-Net's pooling and nearest
    up-sampling (on a branch weighted by zero), so unetcell tiles it as a depth-1 U-Net with
    same padding; every layer is a plain Keras layer, loaded in safe mode."""
    import keras
    import numpy as np

    from unetcell.config import Config
    from unetcell.model import save_model

    image = keras.Input((None, None, 1))
    logits = keras.layers.Conv2D(2, 1, padding="same")
    intensity = logits(image)
    logits.set_weights([np.array([[[[0.0, steepness]]]]), np.array([0.0, -steepness * level])])
    coarse = keras.layers.UpSampling2D(2, interpolation="nearest")(keras.layers.MaxPooling2D(2)(image))
    nothing = keras.layers.Conv2D(2, 1, padding="same", kernel_initializer="zeros")(coarse)
    probabilities = keras.layers.Softmax()(keras.layers.Add()([intensity, nothing]))
    config = Config().override("model", depth=1, padding="same", upsampling="nearest")
    return save_model(keras.Model(image, probabilities), path, config)


def bright_cells_probability(normalised, steepness: float = 50.0, level: float = 0.5):
    """What `save_bright_cells_unet`'s model answers, in numpy."""
    import numpy as np

    return 1.0 / (1.0 + np.exp(-steepness * (np.asarray(normalised, np.float64) - level)))
