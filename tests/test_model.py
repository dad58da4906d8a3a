"""The U-Net's size arithmetic checked against the built model, and the paper's network."""

import keras
import numpy as np
import pytest

from unetcell.config import Config, ModelConfig
from unetcell.errors import ConfigError, OutputExistsError
from unetcell.model import (
    build_unet,
    is_valid_input_size,
    load_model,
    margin,
    output_size,
    save_model,
    valid_input_size,
)


def test_paper_sizes_572_gives_388_with_margin_92():
    assert output_size(572, 4) == 388
    assert margin(4) == 92
    assert valid_input_size(572, 4) == 572


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("padding", ["valid", "same"])
def test_arithmetic_matches_the_built_model(depth, padding):
    model = build_unet(ModelConfig(filters=2, depth=depth, padding=padding, dropout=0.0))
    sizes = [n for n in range(8, 200) if is_valid_input_size(n, depth, padding)][:4]
    assert sizes, "no valid sizes found"
    for n in sizes:
        out = model(np.zeros((1, n, n + 2**depth, 1), np.float32))
        assert out.shape[1] == output_size(n, depth, padding)
        assert out.shape[2] == output_size(n + 2**depth, depth, padding)
        if padding == "valid":
            assert n - out.shape[1] == 2 * margin(depth)


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_invalid_sizes_are_rejected_not_floored(depth):
    valid = valid_input_size(100, depth)
    for n in range(valid + 1, valid + 2**depth):
        assert not is_valid_input_size(n, depth)
        with pytest.raises(ConfigError, match="Nearest valid size"):
            output_size(n, depth)


def test_valid_input_size_rounds_to_the_lattice():
    smallest = valid_input_size(1, 4)
    assert is_valid_input_size(smallest, 4) and not any(is_valid_input_size(n, 4) for n in range(1, smallest))
    for n in range(1, 700, 7):
        nearest = valid_input_size(n, 4)
        up, down = valid_input_size(n, 4, rounding="up"), valid_input_size(n, 4, rounding="down")
        assert all(is_valid_input_size(v, 4) for v in (nearest, up, down))
        if n >= smallest:
            assert down <= n <= up and up - down <= 16 and abs(nearest - n) <= 8
        else:
            assert nearest == up == down == smallest


def _paper_parameter_count(filters=64, depth=4, channels=1, classes=2):
    """Independent count: two 3x3 convolutions per level, 2x2 up-convolutions, 1x1 classifier."""
    conv = lambda cin, cout, k: k * k * cin * cout + cout  # noqa: E731
    total, cin = 0, channels
    for level in range(depth + 1):
        f = filters * 2**level
        total += conv(cin, f, 3) + conv(f, f, 3)
        cin = f
    for level in reversed(range(depth)):
        f = filters * 2**level
        total += conv(cin, f, 2)  # up-convolution
        total += conv(2 * f, f, 3) + conv(f, f, 3)
        cin = f
    return total + conv(cin, classes, 1)


def test_paper_model_has_23_convolutions_and_the_expected_parameters():
    model = build_unet()
    convs = [layer for layer in model.layers
             if isinstance(layer, (keras.layers.Conv2D, keras.layers.Conv2DTranspose))]
    assert len(convs) == 23
    assert model.count_params() == _paper_parameter_count() == 31_030_658


@pytest.mark.parametrize("upsampling", ["bilinear", "nearest"])
def test_interpolating_upsampling_keeps_the_arithmetic(upsampling):
    model = build_unet(ModelConfig(filters=2, depth=2, upsampling=upsampling, batch_norm=True))
    assert model(np.zeros((1, 92, 92, 3 - 2), np.float32)).shape == (1, output_size(92, 2), output_size(92, 2), 2)


def test_saved_model_loads_in_safe_mode_with_its_config(tmp_path):
    config = Config().override("model", filters=3, depth=2, channels=2).override("targets", w0=7.0)
    model = build_unet(config.model)
    path = save_model(model, tmp_path / "m.keras", config)
    x = np.random.default_rng(0).random((1, 60, 60, 2)).astype(np.float32)
    plain = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(plain(x), model(x))
    loaded, loaded_config = load_model(path)
    assert loaded_config == config
    np.testing.assert_array_equal(loaded(x), model(x))


def test_save_model_refuses_to_overwrite(tmp_path):
    config = Config().override("model", filters=2, depth=1)
    path = save_model(build_unet(config.model), tmp_path / "m.keras", config)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        save_model(build_unet(config.model), path, config)
