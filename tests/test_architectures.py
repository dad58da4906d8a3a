"""The architectures beside the U-Net (--arch): their structure, their size rules, the measured
receptive field that tiles them, tiled prediction against one whole-image pass, and export."""

from dataclasses import replace

import keras
import numpy as np
import pytest

from unetcell.config import ARCHITECTURES, Config, ModelConfig, config_from_dict
from unetcell.deeplab import ASPP_RATES, IMAGE_POOL_WINDOW, image_pool_window
from unetcell.errors import ConfigError
from unetcell.export import FOREGROUND, INPUT, SIGNATURE
from unetcell.fcn import bilinear_kernel
from unetcell.geometry import Geometry, TileGeometry, smallest_tile
from unetcell.model import build_model, build_unet, load_model, save_model, saved_config
from unetcell.predict import choose_tile
from unetcell.receptive import _CACHE_ATTRIBUTE, impulse_response_radius, receptive_radius
from unetcell.tiling import forward_fn, predict_tiled, whole_image_predict


def tiny(arch, **model):
    keras.utils.set_random_seed(1)
    return build_model(ModelConfig(arch=arch, filters=4, dropout=0.0, **model))


def test_arch_defaults_to_unet_and_a_config_saved_without_it_loads_as_unet():
    assert ModelConfig().arch == "unet"
    assert config_from_dict({"model": {"filters": 8, "depth": 3}}).model.arch == "unet"
    with pytest.raises(ConfigError, match="model.arch must be one of unet, unet-separable"):
        ModelConfig(arch="segnet")


def test_a_unet_saved_before_arch_existed_loads_and_tiles_as_the_unet(tmp_path):
    config = Config().override("model", filters=4, depth=2, dropout=0.0)
    model = build_unet(config.model)
    path = save_model(model, tmp_path / "old.keras", config)
    # What an older unetcell wrote: the same file with no arch in its [model] table.
    import zipfile

    from unetcell.model import CONFIG_ENTRY
    with zipfile.ZipFile(path) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    text = entries[CONFIG_ENTRY].decode().replace('arch = "unet"\n', "")
    assert "arch" not in text
    with zipfile.ZipFile(path, "w") as z:
        for name, data in entries.items():
            z.writestr(name, text if name == CONFIG_ENTRY else data)
    loaded, saved = load_model(path)
    assert saved.model.arch == "unet" and loaded.name == "unet"
    assert Geometry.of_model(loaded) == Geometry(2, "valid", "transpose")


def test_build_model_builds_each_architecture_with_the_input_size_as_output():
    for arch, size, out in (("unet", 140, 100), ("unet-separable", 140, 100), ("fcn8s", 96, 96),
                            ("deeplabv3plus", 80, 80)):
        model = tiny(arch, depth=2) if arch.startswith("unet") else tiny(arch)
        y = np.asarray(model(np.random.default_rng(0).random((1, size, size, 1), np.float32)))
        assert y.shape == (1, out, out, 2), arch
        np.testing.assert_allclose(y.sum(-1), 1, atol=1e-5)


def test_separable_unet_has_the_unets_shape_for_far_fewer_weights():
    plain = build_unet(ModelConfig(filters=64))
    separable = build_unet(ModelConfig(arch="unet-separable", filters=64))
    assert [layer.name for layer in plain.layers] == [layer.name for layer in separable.layers]
    # Each 3x3 convolution n -> m: 9nm weights plain, 9n + nm separable; the rest is shared.
    saved = sum(9 * n * m - 9 * n - n * m
                for layer in plain.layers if getattr(layer, "kernel_size", None) == (3, 3)
                for n, m in [layer.kernel.shape[2:]])
    assert plain.count_params() - separable.count_params() == saved
    assert separable.count_params() / plain.count_params() < 0.2
    assert sum(isinstance(layer, keras.layers.SeparableConv2D) for layer in separable.layers) == 18


def test_fcn8s_skip_architecture_and_bilinear_upsampling():
    model = tiny("fcn8s")
    names = {layer.name: layer for layer in model.layers}
    assert {"score_pool3", "score_pool4", "fuse_pool3", "fuse_pool4", "upscore8"} <= set(names)
    # Skip scores start at zero (training starts as FCN-32s); the 8x step is fixed.
    assert not np.any(names["score_pool4"].get_weights()[0])
    assert not names["upscore8"].trainable and names["upscore2"].trainable
    # The transposed convolution with the bilinear kernel is bilinear interpolation: a linear
    # ramp comes out as the finer ramp (away from the zero-padded border).
    layer = keras.layers.Conv2DTranspose(1, 16, strides=8, padding="same", use_bias=False)
    layer.build((None, None, None, 1))
    layer.set_weights([bilinear_kernel(16, 1)])
    ramp = np.arange(8, dtype=np.float32)
    coarse = np.broadcast_to(ramp[:, None], (8, 8))[None, :, :, None]
    fine = np.asarray(layer(coarse))[0, :, :, 0]
    expected = (np.arange(64) - 3.5) / 8  # pixel centres of the fine grid in coarse units
    np.testing.assert_allclose(fine[8:-8, 32], expected[8:-8], atol=1e-5)


def test_deeplab_has_aspp_rates_image_pooling_separable_convs_and_low_level_decoder():
    model = tiny("deeplabv3plus")
    layers = {layer.name: layer for layer in model.layers}
    for rate in ASPP_RATES:
        assert isinstance(layers[f"aspp_rate{rate}"], keras.layers.SeparableConv2D)
        assert layers[f"aspp_rate{rate}"].dilation_rate == (rate, rate)
    assert layers["aspp_pool"].pool_size == (IMAGE_POOL_WINDOW, IMAGE_POOL_WINDOW)
    assert layers["block4_sep1"].dilation_rate == (2, 2)  # atrous, output stride 16 kept
    assert isinstance(layers["decoder_sep1"], keras.layers.SeparableConv2D)
    # The decoder merges stride-4 features: it sees input detail finer than stride 16.
    assert layers["decoder_concat"].input[1].shape[-1] == 6


@pytest.mark.parametrize("stride", [16, 8])
def test_image_pooling_over_the_window_is_the_whole_tile_average_on_a_training_tile(stride):
    features = 256 // stride  # a 256-pixel tile
    x = np.random.default_rng(0).random((1, features, features, 3)).astype(np.float32)
    window = image_pool_window(stride)
    assert window == {16: IMAGE_POOL_WINDOW, 8: 63}[stride]
    pooled = np.asarray(keras.layers.AveragePooling2D(window, strides=1, padding="same")(x))
    np.testing.assert_allclose(pooled, np.broadcast_to(x.mean((1, 2), keepdims=True), x.shape), rtol=1e-5)


def test_strided_size_rules():
    fcn = Geometry.of_config(ModelConfig(arch="fcn8s"))
    assert (fcn.grid, fcn.margin, fcn.valid_tile(100), fcn.valid_tile(100, "up"), fcn.output_size(96)) == (
        32, 0, 96, 128, 96)
    with pytest.raises(ConfigError, match=r"for fcn8s \(stride 32\); nearest valid size: 96"):
        fcn.check_tile(100)
    deeplab = Geometry.of_config(ModelConfig(arch="deeplabv3plus"))
    assert (deeplab.grid, deeplab.valid_tile(572), deeplab.upsampling) == (16, 576, "bilinear")
    config = Config().override("model", arch="deeplabv3plus").override("train", tile=572)
    assert TileGeometry.for_config(config) == TileGeometry(576, 576)
    separable = Config().override("model", arch="unet-separable")
    assert TileGeometry.for_config(separable) == TileGeometry(572, 388)
    assert Geometry.of_config(ModelConfig(arch="unet-separable", depth=2, padding="same")) == \
        Geometry.of_model(tiny("unet-separable", depth=2, padding="same")) == Geometry(2, "same")
    with pytest.raises(ConfigError, match="measured on the built network"):
        _ = fcn.context


def test_impulse_probe_measures_known_receptive_fields():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, None, 1))
    x = keras.layers.Conv2D(4, 5, padding="same", activation="relu")(inputs)  # radius 2
    x = keras.layers.Conv2D(4, 3, padding="same", dilation_rate=6, activation="relu")(x)  # + 6
    x = keras.layers.MaxPooling2D(2)(x)  # + up to 1
    x = keras.layers.Conv2D(2, 3, padding="same")(x)  # + 2 at stride 2
    x = keras.layers.UpSampling2D(2)(x)
    model = keras.Model(inputs, x)
    # 2 + 6 + 1 + 2 * 1 (the 3x3 at stride 2) + 1 (pool and nearest grouping) = 11 at most.
    radius = receptive_radius(model, grid=2)
    assert 9 <= radius <= 11, radius
    assert receptive_radius(model, grid=2) == radius  # cached on the model

    inputs = keras.Input((None, None, 1))
    pooled = keras.layers.GlobalAveragePooling2D(keepdims=True)(inputs)
    model = keras.Model(inputs, keras.layers.Add()([inputs, pooled]))
    with pytest.raises(ConfigError, match="cannot be tiled exactly"):
        receptive_radius(model, grid=2)


def test_impulse_probe_reports_a_field_reaching_the_edge_as_unknown():
    assert impulse_response_radius(lambda x: x.cumsum(axis=1), 64, 1, 8) is None
    assert impulse_response_radius(lambda x: x, 64, 1, 8) == 0


def test_measured_field_of_a_padded_unet_is_inside_its_context_rule():
    model = tiny("unet", depth=2, padding="same")
    assert receptive_radius(model, 4) <= Geometry.of_model(model).context


# Tiled against one pass over the whole mirrored image, per architecture: every pixel kept from
# a tile at least the measured receptive field away from that tile's zero padding.
@pytest.mark.parametrize("arch, model, tolerance", [
    ("unet-separable", dict(depth=2), 1e-5),
    ("unet-separable", dict(depth=2, padding="same", upsampling="bilinear"), 1e-5),
    ("fcn8s", {}, 1e-5),
    ("deeplabv3plus", {}, 1e-5),
])
def test_tiled_prediction_equals_the_whole_image_pass(arch, model, tolerance):
    net = tiny(arch, **model)
    geometry = Geometry.of_model(net)
    predict_fn = forward_fn(net, "foreground", geometry)
    image = np.random.default_rng(4).random((150, 170, 1)).astype(np.float32)
    tile = geometry.valid_tile(smallest_tile(geometry) + 2 * geometry.grid, "up")
    tiled = predict_tiled(image, predict_fn, tile, geometry)
    whole = whole_image_predict(image, predict_fn, geometry)
    assert tiled.shape == whole.shape == (150, 170)
    error = np.abs(tiled - whole).max()
    assert error <= tolerance
    # The test has teeth: with a quarter of the measured context the seams show.
    if geometry.strided:
        short = Geometry(geometry.depth, "same", geometry.upsampling, arch, geometry.receptive // 4)
        seamed = predict_tiled(image, predict_fn, short.valid_tile(smallest_tile(short) + 2 * short.grid, "up"), short)
        assert np.abs(seamed - whole).max() > 20 * max(error, 1e-6)


def test_every_architecture_is_in_the_cli():
    from click.testing import CliRunner

    from unetcell.cli import main

    help_text = CliRunner().invoke(main, ["train", "--help"]).output
    for arch in ARCHITECTURES:
        assert arch in help_text


EXPORTED = ["unet-separable", "fcn8s", "deeplabv3plus"]

# `unetcell.export.check_export`'s fresh process (TensorFlow alone: Keras unimportable,
# unetcell not on the path) for several SavedModels at once, to pay TensorFlow's start once.
SERVE_EACH = f"""
import sys
sys.modules["keras"] = sys.modules["tf_keras"] = None
import numpy as np, tensorflow as tf
source, target, *saved = sys.argv[1:]
images = tf.constant(np.load(source))
out = {{}}
for i, path in enumerate(saved):
    serve = tf.saved_model.load(path).signatures["{SIGNATURE}"]
    out[str(i)] = serve({INPUT}=images)["{FOREGROUND}"].numpy()
if "unetcell" in sys.modules:
    sys.exit("loading a SavedModel imported unetcell")
np.savez(target, **out)
"""


@pytest.fixture(scope="module")
def served_and_predicted(tmp_path_factory):
    """arch -> (the SavedModel's foreground probability of a raw 150 x 201 image, served in a
    fresh process; `unetcell predict`'s of the same image), as `check_export` compares them."""
    import os
    import subprocess
    import sys

    from unetcell.export import export_model
    from unetcell.predict import load_predictor

    folder = tmp_path_factory.mktemp("export")
    image = (np.random.default_rng(0).random((150, 201, 1)) * 255).round().astype(np.float32)
    np.save(folder / "image.npy", image[None])
    saved, predicted = [], []
    for arch in EXPORTED:
        depth = dict(depth=2) if arch == "unet-separable" else {}  # the others have their own
        config = Config().override("model", arch=arch, filters=4, dropout=0.0, **depth)
        keras.utils.set_random_seed(3)
        model = save_model(build_model(config.model), folder / f"{arch}.keras", config)
        saved.append(str(export_model(model, folder / arch / "1")))
        predicted.append(load_predictor(model).probabilities(image))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-I", "-c", SERVE_EACH, str(folder / "image.npy"),
                          str(folder / "served.npz"), *saved],
                         cwd=folder, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    with np.load(folder / "served.npz") as served:
        return {arch: (served[str(i)][0], predicted[i]) for i, arch in enumerate(EXPORTED)}


@pytest.mark.slow
@pytest.mark.parametrize("arch", EXPORTED)
def test_export_serves_each_architecture_as_predict_does(arch, served_and_predicted):
    served, predicted = served_and_predicted[arch]
    assert served.shape == predicted.shape == (150, 201)
    assert np.abs(served - predicted).max() < 1e-5


# --- the U-Net's settings on FCN-8s and DeepLabv3+: honoured, or refused in one line ------------

@pytest.mark.parametrize("arch, setting, message", [
    ("fcn8s", dict(depth=3), r"model.depth \(--depth\) is fixed at 5 for fcn8s: VGG-16's five poolings"),
    ("fcn8s", dict(depth=6), r"is fixed at 5 for fcn8s.*Received: 6$"),
    ("deeplabv3plus", dict(depth=2), r"model.depth \(--depth\) sets the output stride 2\*\*depth of "
                                      r"deeplabv3plus: 4 \(16, the default\) or 3 \(8"),
    ("deeplabv3plus", dict(depth=5), r"Received: 5$"),
    ("deeplabv3plus", dict(upsampling="nearest"), r"model.upsampling is bilinear for deeplabv3plus"),
])
def test_a_setting_the_architecture_does_not_have_is_refused_in_one_line(arch, setting, message):
    for make in (lambda: ModelConfig(arch=arch, **setting),
                 lambda: config_from_dict({"model": dict(arch=arch, **setting)}),  # config.toml
                 lambda: Config().override("model", **setting).override("model", arch=arch)):
        with pytest.raises(ConfigError, match=message) as error:
            make()
        assert "\n" not in str(error.value)


def test_the_cli_refuses_a_depth_fcn8s_does_not_have_before_any_work(tmp_path):
    from click.testing import CliRunner

    from unetcell.cli import main

    result = CliRunner().invoke(main, ["train", str(tmp_path / "no-data"), "--out", str(tmp_path / "run"),
                                       "--arch", "fcn8s", "--depth", "3"])
    assert result.exit_code == 1
    assert "model.depth (--depth) is fixed at 5 for fcn8s" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()
    # The U-Net's defaults, typed: the config alone cannot tell them from untouched ones.
    for arch, typed, said in [("fcn8s", ["--depth", "4"], "five poolings"),
                              ("fcn8s", ["--padding", "valid"], "zero-padded"),
                              ("deeplabv3plus", ["--padding", "valid"], "zero-padded"),
                              ("deeplabv3plus", ["--upsampling", "transpose"], "up-samples bilinear"),
                              ("deeplabv3plus", ["--upsampling", "nearest"], "model.upsampling is bilinear")]:
        result = CliRunner().invoke(main, ["train", str(tmp_path / "no-data"), "--out", str(tmp_path / "run"),
                                           "--arch", arch, *typed])
        assert result.exit_code == 1 and said in result.output and "Traceback" not in result.output
        assert not (tmp_path / "run").exists()


def test_the_unets_defaults_build_fcn8s_and_deeplab_as_published_and_old_saved_configs_load(tmp_path):
    # What the last version saved with these networks: the U-Net's defaults in [model].
    for arch in ("fcn8s", "deeplabv3plus"):
        saved = config_from_dict({"model": dict(arch=arch, depth=4, padding="valid", upsampling="transpose")})
        assert saved.model == ModelConfig(arch=arch)
    assert Geometry.of_config(ModelConfig(arch="fcn8s")) == Geometry.of_config(
        ModelConfig(arch="fcn8s", depth=5, padding="same")) == Geometry(5, "same", "transpose", "fcn8s")
    assert Geometry.of_config(ModelConfig(arch="deeplabv3plus")) == Geometry.of_config(
        ModelConfig(arch="deeplabv3plus", padding="same", upsampling="bilinear")) == \
        Geometry(4, "same", "bilinear", "deeplabv3plus")
    # Explicitly the values the networks have: the same networks, layer for layer.
    for arch, setting in (("deeplabv3plus", dict(depth=4, padding="same", upsampling="bilinear")),
                          ("fcn8s", dict(depth=5, padding="same"))):
        default, explicit = tiny(arch), tiny(arch, **setting)
        assert [(layer.name, layer.count_params()) for layer in default.layers] == \
            [(layer.name, layer.count_params()) for layer in explicit.layers]
    config = Config().override("model", arch="fcn8s", filters=4, dropout=0.0)
    save_model(default, tmp_path / "fcn.keras", config)
    loaded, saved = load_model(tmp_path / "fcn.keras")
    # The config read back describes the network in the file.
    assert (saved.model.depth, saved.model.padding) == (5, "same") and loaded.get_layer("score_pool3")


def rewrite_config(path, **model):
    """`path` as an older unetcell wrote it: the same model with `model` in its [model] table."""
    import zipfile

    import tomli_w
    import tomllib

    from unetcell.model import CONFIG_ENTRY
    with zipfile.ZipFile(path) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    data = tomllib.loads(entries[CONFIG_ENTRY].decode())
    data["model"].update(model)
    entries[CONFIG_ENTRY] = tomli_w.dumps(data).encode()
    with zipfile.ZipFile(path, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return path


def test_a_model_saved_with_a_setting_its_network_ignored_loads_as_the_network_it_is(tmp_path):
    from unetcell.errors import DataError

    # The last version ignored --depth for these networks and saved what the user typed.
    config = Config().override("model", arch="deeplabv3plus", filters=4, dropout=0.0)
    path = save_model(tiny("deeplabv3plus"), tmp_path / "deeplab.keras", config)  # stride 16
    _, saved = load_model(rewrite_config(path, depth=3, upsampling="nearest"))
    assert (saved.model.depth, saved.model.upsampling) == (4, "bilinear")
    config = Config().override("model", arch="fcn8s", filters=4, dropout=0.0, upsampling="nearest")
    path = save_model(tiny("fcn8s", upsampling="nearest"), tmp_path / "fcn.keras", config)
    saved = saved_config(rewrite_config(path, depth=2, upsampling="transpose"))  # what load_model reads
    assert (saved.model.depth, saved.model.padding, saved.model.upsampling) == (5, "same", "nearest")
    with pytest.raises(DataError, match="its config says deeplabv3plus, but its Keras config.json does not"):
        saved_config(rewrite_config(path, arch="deeplabv3plus"))


def known_receptive(model, radius=100):
    """`model` with its receptive field's radius set, so `Geometry.of_model` reads its layers
    without the impulse probe (measured in the tests above)."""
    setattr(model, _CACHE_ATTRIBUTE, radius)
    return model


def test_deeplab_depth_3_is_output_stride_8_with_doubled_rates():
    model = tiny("deeplabv3plus", depth=3)
    layers = {layer.name: layer for layer in model.layers}
    for rate in ASPP_RATES:
        assert layers[f"aspp_rate{2 * rate}"].dilation_rate == (2 * rate, 2 * rate)
    assert layers["block3_sep3"].strides == (1, 1) and layers["block3_sep1"].dilation_rate == (2, 2)
    assert layers["block4_sep1"].dilation_rate == (4, 4)
    assert layers["aspp_pool"].pool_size == (63, 63) and layers["decoder_upsample"].size == (2, 2)
    # Features at stride 8: the ASPP sees a 5 x 7 map of a 40 x 56 image, and the output has its size.
    image = np.random.default_rng(0).random((1, 40, 56, 1), np.float32)
    assert tuple(layers["aspp_concat"].output.shape[1:3]) == (None, None)
    features = keras.Model(model.input, layers["aspp_concat"].output)(image)
    assert features.shape[1:3] == (5, 7) and model(image).shape == (1, 40, 56, 2)
    geometry = Geometry.of_model(known_receptive(model))
    assert geometry == Geometry(3, "same", "bilinear", "deeplabv3plus", 100) == \
        replace(Geometry.of_config(ModelConfig(arch="deeplabv3plus", depth=3)), receptive=100)
    assert (geometry.grid, geometry.context, geometry.valid_tile(100), geometry.output_size(104)) == (8, 104, 104, 104)
    # A model of the last version (stride 16) still reads as stride 16.
    assert Geometry.of_model(known_receptive(tiny("deeplabv3plus"))).grid == 16


@pytest.mark.parametrize("upsampling", ["transpose", "bilinear", "nearest"])
def test_fcn8s_honours_the_upsampling_mode_of_its_2x_steps(upsampling):
    model = tiny("fcn8s", upsampling=upsampling)
    layers = {layer.name: layer for layer in model.layers}
    for name in ("upscore2", "upscore_pool4"):
        if upsampling == "transpose":
            assert isinstance(layers[name], keras.layers.Conv2DTranspose) and layers[name].trainable
        else:
            assert isinstance(layers[name], keras.layers.UpSampling2D)
            assert layers[name].interpolation == upsampling
    assert isinstance(layers["upscore8"], keras.layers.Conv2DTranspose)  # the fixed 8x bilinear step
    assert Geometry.of_model(known_receptive(model)).upsampling == upsampling
    assert Geometry.of_config(ModelConfig(arch="fcn8s", upsampling=upsampling)).upsampling == upsampling


@pytest.mark.parametrize("arch", ["fcn8s", "deeplabv3plus"])
def test_batch_norm_dropout_and_filters_are_honoured(arch):
    plain = tiny(arch)  # 4 filters, no dropout, no batch norm
    keras.utils.set_random_seed(1)
    other = build_model(ModelConfig(arch=arch, filters=8, dropout=0.3, batch_norm=True))
    assert not any(isinstance(layer, (keras.layers.BatchNormalization, keras.layers.Dropout))
                   for layer in plain.layers)
    assert sum(isinstance(layer, keras.layers.BatchNormalization) for layer in other.layers) >= 10
    rates = [layer.rate for layer in other.layers if isinstance(layer, keras.layers.Dropout)]
    assert rates and set(rates) == {0.3}
    assert other.count_params() > 3 * plain.count_params()


def test_tile_messages_name_the_architecture():
    fcn = Geometry(5, "same", "transpose", "fcn8s", receptive=236)
    tile, note = choose_tile(100, fcn)
    assert tile == 544 and note == ("tile 100 is too small for fcn8s (stride 32); using the smallest "
                                    "tile that keeps any output, 544")
    tile, note = choose_tile(1000, Geometry(3, "same", "bilinear", "deeplabv3plus", receptive=469))
    assert tile == 1000 and note is None
    tile, note = choose_tile(1003, Geometry(3, "same", "bilinear", "deeplabv3plus", receptive=469))
    assert tile == 1000 and note == ("tile 1003 is not a valid input size for deeplabv3plus (stride 8); "
                                     "using the nearest valid size, 1000")
    assert choose_tile(573, Geometry(4))[1] == ("tile 573 is not a valid input size for a depth-4 U-Net "
                                                "with valid padding; using the nearest valid size, 572")
