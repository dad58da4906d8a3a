"""The U-Net (paper section 2, Figure 1) and its size arithmetic.

With unpadded ("valid") convolutions every 3x3 convolution trims one pixel per side and every
2x2 pooling must see an even size, so only some input sizes are valid and the output is
smaller than the input by a fixed margin (572 -> 388 at depth 4, a margin of 92 per side).
Keras does not check this: pooling floors an odd size and the centre crop hides the
mismatch, so an invalid size silently gives a shifted, wrong output. That arithmetic
(`valid_input_size`, `output_size`, `margin`) lives in the keras-free `unetcell.geometry`,
which training, prediction and the serving graph share; it is re-exported here.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import keras
from keras import layers

from . import __version__
from .config import Config, ModelConfig, config_from_dict, config_to_toml
from .errors import DataError
from .files import atomic_path, check_writable
from .geometry import is_valid_input_size, margin, output_size, valid_input_size  # noqa: F401

# The unetcell settings (normalisation, targets, prediction) travel inside the .keras file, so
# `unetcell predict MODEL` needs nothing else; Keras ignores zip entries it does not know.
CONFIG_ENTRY = "unetcell_config.toml"

# Which unetcell wrote a model, and the format of what it put inside the .keras file besides
# Keras' own entries (the config, the layers it registers). Bump MODEL_FORMAT when a model
# saved by this version cannot be read by an older one; models from before the entry existed
# are format 1.
VERSION_ENTRY = "unetcell_version.json"
MODEL_FORMAT = 1


def build_unet(config: ModelConfig | None = None, name: str = "unet") -> keras.Model:
    """The U-Net of the paper: a functional Keras model from images to class probabilities.

    Contracting path: per level two 3x3 convolutions + ReLU and a 2x2 max pooling, doubling
    the filters. Expansive path: a 2x2 up-convolution halving the filters (or bilinear /
    nearest up-sampling followed by a 2x2 convolution), concatenation with the centre-cropped
    contracting feature map, two 3x3 convolutions + ReLU. Dropout at the end of the
    contracting path; a final 1x1 convolution and a softmax over the classes. Weights are He
    normal (std sqrt(2/N), section 3). At the defaults: 23 convolutions, 572 -> 388.

    The input's height and width are left open, so one model serves training tiles and
    prediction tiles of any valid size.

    With `config.arch` "unet-separable" every 3x3 convolution is depthwise separable (a 3x3
    filter per channel, then a 1x1 convolution across channels, as in Xception and
    DeepLabv3+): the same receptive field and size arithmetic for about 1/9 + 1/filters of the
    weights and multiply-adds (README, Architectures).
    """
    config = config or ModelConfig()
    common = dict(kernel_size=3, padding=config.padding, use_bias=not config.batch_norm)
    if config.arch == "unet-separable":
        make_conv = lambda filters, name: layers.SeparableConv2D(  # noqa: E731
            filters, depthwise_initializer="he_normal", pointwise_initializer="he_normal",
            name=name, **common)
    else:
        make_conv = lambda filters, name: layers.Conv2D(  # noqa: E731
            filters, kernel_initializer="he_normal", name=name, **common)

    def double_conv(x, filters, prefix):
        for i in (1, 2):
            x = make_conv(filters, f"{prefix}_conv{i}")(x)
            if config.batch_norm:
                x = layers.BatchNormalization(name=f"{prefix}_bn{i}")(x)
            x = layers.ReLU(name=f"{prefix}_relu{i}")(x)
        return x

    inputs = keras.Input((None, None, config.channels), name="image")
    x = inputs
    skips = []
    for level in range(config.depth):
        x = double_conv(x, config.filters * 2**level, f"down{level}")
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"down{level}_pool")(x)
    x = double_conv(x, config.filters * 2**config.depth, "bottom")
    if config.dropout:
        x = layers.Dropout(config.dropout, name="bottom_dropout")(x)
    for level in reversed(range(config.depth)):
        filters = config.filters * 2**level
        if config.upsampling == "transpose":
            x = layers.Conv2DTranspose(
                filters, 2, strides=2, kernel_initializer="he_normal", name=f"up{level}_upconv"
            )(x)
        else:
            x = layers.UpSampling2D(2, interpolation=config.upsampling, name=f"up{level}_upsample")(x)
            # "same" keeps the 2x grid of the up-sampled map, so the size arithmetic holds.
            x = layers.Conv2D(
                filters, 2, padding="same", kernel_initializer="he_normal", name=f"up{level}_upconv"
            )(x)
        skip = CenterCrop2D(name=f"up{level}_crop")([skips[level], x])
        x = layers.Concatenate(name=f"up{level}_concat")([skip, x])
        x = double_conv(x, filters, f"up{level}")
    x = layers.Conv2D(config.classes, 1, kernel_initializer="he_normal", name="classifier")(x)
    # float32 softmax keeps probabilities exact under a mixed-precision policy.
    outputs = layers.Softmax(dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=name)


def build_model(config: ModelConfig | None = None) -> keras.Model:
    """The network `config.arch` names, built from scratch: the U-Net (or its separable
    variant), FCN-8s (`unetcell.fcn`) or DeepLabv3+ (`unetcell.deeplab`)."""
    config = config or ModelConfig()
    if config.arch == "fcn8s":
        from .fcn import build_fcn8s

        return build_fcn8s(config)
    if config.arch == "deeplabv3plus":
        from .deeplab import build_deeplabv3plus

        return build_deeplabv3plus(config)
    return build_unet(config, name=config.arch.replace("-", "_"))


@keras.saving.register_keras_serializable(package="unetcell")
class CenterCrop2D(layers.Layer):
    """Crop the first input to the height and width of the second, keeping its centre.

    Keras' Cropping2D needs fixed integers; the U-Net's skip connections need a crop that
    follows the tile size, which is only known at run time. The sizes differ by an even number
    for every valid input size, so the crop is symmetric.
    """

    def call(self, inputs):
        source, like = inputs
        shape = keras.ops.shape(source)
        target = keras.ops.shape(like)
        top = (shape[1] - target[1]) // 2
        left = (shape[2] - target[2]) // 2
        return keras.ops.slice(
            source, [0, top, left, 0], [shape[0], target[1], target[2], shape[3]]
        )

    def compute_output_shape(self, input_shapes):
        source, like = input_shapes
        return (source[0], like[1], like[2], source[3])


def save_model(
    model: keras.Model, path: str | os.PathLike, config: Config, overwrite: bool = False,
    include_optimizer: bool = True, extra: dict[str, str] | None = None,
) -> Path:
    """Save a .keras file atomically, with the unetcell config and version inside it (and the
    `extra` entries, such as a checkpoint's training state, so they are renamed together)."""
    path = check_writable(path, overwrite)
    with atomic_path(path) as tmp:
        model.save(tmp, include_optimizer=include_optimizer)
        with zipfile.ZipFile(tmp, "a") as archive:
            archive.writestr(CONFIG_ENTRY, config_to_toml(config))
            archive.writestr(VERSION_ENTRY, json.dumps({"unetcell": __version__, "format": MODEL_FORMAT}))
            for name, text in (extra or {}).items():
                archive.writestr(name, text)
    return path


def _check_version(path: Path, archive: zipfile.ZipFile) -> None:
    """Refuse a model whose format this unetcell cannot read, saying which version is needed."""
    if VERSION_ENTRY not in archive.namelist():
        return  # written before versions were stored: format 1
    try:
        saved = json.loads(archive.read(VERSION_ENTRY).decode())
        fmt, version = int(saved["format"]), str(saved["unetcell"])
    except (ValueError, KeyError, TypeError):
        raise DataError(f"{path}: its {VERSION_ENTRY} is damaged; the file is not a usable unetcell model") from None
    if fmt > MODEL_FORMAT:
        raise DataError(
            f"{path}: was saved by unetcell {version} (model format {fmt}); this is unetcell "
            f"{__version__}, which reads model format {MODEL_FORMAT}: install unetcell >= {version} "
            f"(pip install -U 'unetcell>={version}') to use it"
        )


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def saved_entry(path: str | os.PathLike, name: str) -> str | None:
    """The text of an entry unetcell stored inside a .keras file (None when absent)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.read(name).decode() if name in archive.namelist() else None
    except (zipfile.BadZipFile, OSError, ValueError):
        return None


def saved_config(path: str | os.PathLike) -> Config | None:
    """The unetcell config saved inside a .keras file, without loading the model; None for a
    plain Keras model saved elsewhere."""
    import tomllib

    path = Path(path)
    text = _open_model_file(path, read_config=True)
    if text is None:
        return None
    data = tomllib.loads(text)
    model = data.get("model")
    if isinstance(model, dict) and model.get("arch") in ("fcn8s", "deeplabv3plus"):
        model.update(_network_settings(path, model["arch"]))
    return config_from_dict(data, source=f"{path}:{CONFIG_ENTRY}")


def _network_settings(path: Path, arch: str) -> dict:
    """depth, padding and upsampling as the FCN-8s or DeepLabv3+ saved in `path` has them, read
    from Keras' own config.json in the archive. unetcell before the settings were checked
    (`unetcell.config._check_arch_settings`) ignored them for these networks and saved what
    the user had typed (a depth of 2, say), which the check now refuses: the network is the
    truth, and the config read back describes it."""
    try:
        with zipfile.ZipFile(path) as archive:
            layers = json.loads(archive.read("config.json"))["config"]["layers"]
        kinds = {layer["config"]["name"]: layer for layer in layers}
        if arch == "fcn8s":
            step = kinds["upscore2"]
            upsampling = step["config"]["interpolation"] if step["class_name"] == "UpSampling2D" else "transpose"
            return dict(depth=5, padding="same", upsampling=upsampling)
        stride = 4 * int(kinds["decoder_upsample"]["config"]["size"][0])  # up-sampled to stride 4
        return dict(depth=stride.bit_length() - 1, padding="same", upsampling="bilinear")
    except (KeyError, TypeError, ValueError, IndexError, zipfile.BadZipFile, OSError):
        raise DataError(f"{path}: its config says {arch}, but its Keras config.json does not hold "
                        f"that network; the file is not a usable unetcell model") from None


def _open_model_file(path: Path, read_config: bool) -> str | None:
    """Check that `path` is a .keras file this unetcell can read; the text of its config
    entry when `read_config` (None when it has none)."""
    if path.suffix != ".keras":
        raise DataError(f"{path}: expected a .keras model file written by `unetcell train`")
    if not path.is_file():
        raise DataError(f"{path}: no such model file")
    try:
        with zipfile.ZipFile(path) as archive:
            _check_version(path, archive)
            if not read_config or CONFIG_ENTRY not in archive.namelist():
                return None
            return archive.read(CONFIG_ENTRY).decode()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise DataError(
            f"{path}: is not a Keras model (a .keras file is a zip archive written by Keras; "
            f"{_first_line(e)})"
        ) from None


def load_model(
    path: str | os.PathLike, compile: bool = False, config: Config | None = None
) -> tuple[keras.Model, Config]:
    """A model saved by unetcell and its config, in Keras' safe mode (no arbitrary code).

    `config`: the settings to use instead of those saved inside, when the caller has them
    already (the CLI reads them with `saved_config` to apply its options), so they are not
    read and parsed twice."""
    path = Path(path)
    if config is None:
        config = saved_config(path)
    else:
        _open_model_file(path, read_config=False)
    try:
        model = keras.saving.load_model(path, compile=compile, safe_mode=True)
    except Exception as e:  # Keras raises many types for a file it cannot rebuild
        if "Lambda" in str(e) or "safe_mode" in str(e):
            raise DataError(
                f"{path}: contains a Lambda layer (arbitrary Python code), which unetcell refuses "
                "to load (Keras safe mode): models from `unetcell train` have none; rebuild the "
                "model without Lambda layers, or use a file from a source you trust"
            ) from None
        raise DataError(f"{path}: cannot be loaded as a Keras model ({_first_line(e)})") from None
    if config is None:
        # A plain Keras U-Net: take its channels and classes from its shapes.
        config = Config().override(
            "model", channels=int(model.input_shape[-1]), classes=int(model.output_shape[-1])
        )
    return model, config
