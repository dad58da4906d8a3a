"""Every setting of unetcell as frozen dataclasses: loaded from TOML, overridden by the CLI,
saved beside the model and read back (the CSBDeep habit: one config object, validated).

A TOML file has one table per section, each key a field of that section's dataclass:

    [model]
    filters = 16
    depth = 3

    [train]
    epochs = 20

Unknown sections or keys are an error that names the file and the key, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import tomli_w
import tomllib

from .errors import ConfigError
from .files import write_text_atomic


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


ARCHITECTURES = ("unet", "unet-separable", "fcn8s", "deeplabv3plus")
SCHEDULES = ("constant", "cosine")  # the learning rate over a run: train.scheduled_learning_rate


@dataclass(frozen=True)
class ModelConfig:
    """The U-Net (paper section 2, Figure 1). The defaults are the paper's network."""

    # unet: the paper's network; unet-separable: the same with depthwise separable 3x3
    # convolutions; fcn8s (Long et al. 2015) and deeplabv3plus (Chen et al. 2018) for comparison
    # (README, Architectures). What the two of them make of depth, padding and upsampling:
    # `_check_arch_settings`.
    arch: str = "unet"
    channels: int = 1  # input channels
    # --channels, applied to every image in train, predict and evaluate before the model sees
    # it: "" all channels as stored, "0,2" these in this order, "gray" the mean of all.
    pick_channels: str = ""
    classes: int = 2  # background and cell
    filters: int = 64  # channels of the first level; doubled at each pooling
    depth: int = 4  # number of 2x2 poolings
    padding: str = "valid"  # valid: the paper's unpadded convolutions; same: zero padding
    upsampling: str = "transpose"  # transpose (paper's up-convolution) | bilinear | nearest
    batch_norm: bool = False
    dropout: float = 0.5  # at the end of the contracting path (paper section 3.1)

    def __post_init__(self) -> None:
        _check(
            self.arch in ARCHITECTURES,
            f"model.arch must be one of {', '.join(ARCHITECTURES)}. Received: {self.arch!r}",
        )
        _check(self.channels >= 1, f"model.channels must be >= 1. Received: {self.channels}")
        _check(
            re.fullmatch(r"(gr[ae]y|\d+(\s*,\s*\d+)*)?", self.pick_channels.strip().lower()) is not None,
            "model.pick_channels (--channels) must be 'gray' or channel indices separated by "
            f"commas, e.g. '0,2'. Received: {self.pick_channels!r}",
        )
        _check(self.classes >= 2, f"model.classes must be >= 2. Received: {self.classes}")
        _check(self.filters >= 1, f"model.filters must be >= 1. Received: {self.filters}")
        _check(1 <= self.depth <= 6, f"model.depth must be in 1..6. Received: {self.depth}")
        _check(
            self.padding in ("valid", "same"),
            f"model.padding must be 'valid' or 'same'. Received: {self.padding!r}",
        )
        _check(
            self.upsampling in ("transpose", "bilinear", "nearest"),
            "model.upsampling must be 'transpose', 'bilinear' or 'nearest'. "
            f"Received: {self.upsampling!r}",
        )
        _check(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1). Received: {self.dropout}")
        _check_arch_settings(self)


# FCN-8s and DeepLabv3+ have structures of their own, so some U-Net settings mean something
# else for them or nothing at all: each is honoured where the network has it and refused where
# it has not, never silently ignored. A config cannot tell a default from a value the user
# typed, so the U-Net's defaults (depth 4, valid padding, transposed up-convolutions) read as
# "not set" and build the network as published (`unetcell.geometry.Geometry.of_config`):
# - fcn8s: five poolings (depth 4 or 5 accepted), zero-padded; upsampling honoured (its 2x
#   steps learned, or fixed bilinear / nearest);
# - deeplabv3plus: depth honoured as the output stride 2**depth (16 or 8), zero-padded,
#   bilinear up-sampling (the default transpose reads as bilinear);
# - both: filters, batch_norm, dropout, channels and classes honoured.
def _check_arch_settings(model: ModelConfig) -> None:
    if model.arch == "fcn8s":
        _check(
            model.depth in (4, 5),
            "model.depth (--depth) is fixed at 5 for fcn8s: VGG-16's five poolings, scored at "
            "pool3, pool4 and pool5 (strides 8, 16 and 32); remove the setting or set 5. "
            f"Received: {model.depth}",
        )
    if model.arch == "deeplabv3plus":
        _check(
            model.depth in (3, 4),
            "model.depth (--depth) sets the output stride 2**depth of deeplabv3plus: 4 (16, the "
            "default) or 3 (8, the ASPP rates doubled to 12, 24 and 36), as in the paper. "
            f"Received: {model.depth}",
        )
        _check(
            model.upsampling in ("transpose", "bilinear"),
            "model.upsampling is bilinear for deeplabv3plus (the paper's decoder: two fixed "
            f"steps to the input grid); remove the setting or set 'bilinear'. Received: {model.upsampling!r}",
        )


@dataclass(frozen=True)
class NormalizeConfig:
    """Percentile normalisation per channel, computed once per image or slide (never per
    tile), stored with the model and applied identically in train, predict and export."""

    lower: float = 1.0  # percentile mapped to 0
    upper: float = 99.8  # percentile mapped to 1
    sample_pixels: int = 4_000_000  # larger slides are subsampled on a stride for the percentiles

    def __post_init__(self) -> None:
        _check(
            0.0 <= self.lower < self.upper <= 100.0,
            f"normalize.lower and normalize.upper must satisfy 0 <= lower < upper <= 100. "
            f"Received: {self.lower}, {self.upper}",
        )


@dataclass(frozen=True)
class TargetsConfig:
    """What the network is taught: classes with carved gaps and the weight map (paper eq. 2)."""

    w0: float = 10.0
    sigma: float = 5.0
    # Exponent of the class-frequency balance w_c: 1 is full inverse-frequency balancing,
    # 0 none. Full balancing pushed foreground probabilities up and merged neighbours on real
    # nuclei (DESIGN.md), so the default is milder.
    balance: float = 0.5
    gap: int = 1  # background pixels carved between touching cells (paper Figure 3c)
    # two-class: the paper's background and cell. three-class: background, cell interior and
    # cell border (the carved gaps included), the boundary U-Net of Caicedo et al. 2019;
    # instances are grown from the interiors (predict.instances "interiors").
    kind: str = "two-class"
    border: int = 2  # three-class: width in pixels of the border class inside each cell

    def __post_init__(self) -> None:
        _check(self.w0 >= 0, f"targets.w0 must be >= 0. Received: {self.w0}")
        _check(self.sigma > 0, f"targets.sigma must be > 0. Received: {self.sigma}")
        _check(0 <= self.balance <= 1, f"targets.balance must be in [0, 1]. Received: {self.balance}")
        _check(self.gap in (0, 1, 2), f"targets.gap must be 0, 1 or 2. Received: {self.gap}")
        _check(self.kind in ("two-class", "three-class"),
               f"targets.kind must be 'two-class' or 'three-class'. Received: {self.kind!r}")
        _check(self.border >= 1, f"targets.border must be >= 1. Received: {self.border}")


@dataclass(frozen=True)
class AugmentConfig:
    """The augmentation pipeline (paper section 3.1): flips, shifts and rotations, gray-value
    variations and the elastic deformation on a coarse grid."""

    enabled: bool = True
    flip: bool = True  # flips and 90-degree rotations
    affine_p: float = 0.5  # small shifts, rotations and scaling
    shift: float = 0.05  # fraction of the tile
    rotate: float = 15.0  # degrees
    scale: float = 0.1
    elastic_p: float = 0.8
    elastic_grid: int = 3
    elastic_sigma: float = 10.0  # pixels, standard deviation of the grid displacements
    brightness_contrast_p: float = 0.5
    gamma_p: float = 0.3
    noise_p: float = 0.3
    blur_p: float = 0.2

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name.endswith("_p"):
                value = getattr(self, f.name)
                _check(0.0 <= value <= 1.0, f"augment.{f.name} must be in [0, 1]. Received: {value}")
        _check(self.elastic_grid >= 2, f"augment.elastic_grid must be >= 2. Received: {self.elastic_grid}")
        _check(self.elastic_sigma >= 0, f"augment.elastic_sigma must be >= 0. Received: {self.elastic_sigma}")


@dataclass(frozen=True)
class TrainConfig:
    """Training (paper section 3): large tiles rather than large batches."""

    # About 600 steps: a few CPU minutes at --filters 16 (352 ms/step for 572 tiles on 2
    # cores); DESIGN.md's real-nuclei measurement separated touching cells after 300.
    epochs: int = 10
    steps_per_epoch: int = 60
    batch_size: int = 1
    tile: int = 572  # input tile edge; rounded to the nearest valid size
    optimizer: str = "adam"  # adam | sgd (momentum below; the paper's choice)
    learning_rate: float = 1e-3
    # cosine: a linear warm-up over the first 5 % of the steps, then a cosine decay towards
    # zero at the last step (epochs x steps_per_epoch); or constant. Cosine is the default on
    # three seeds of every real set (benchmarks/accuracy.py, README): EM pixel error 0.103 ->
    # 0.091, first nuclei split F1 0.960 -> 0.975, phase contrast 0.551 -> 0.604, at the cost
    # of one or two of 27 nuclei on the second split. The paper's set-ups pin "constant".
    schedule: str = "cosine"
    momentum: float = 0.99  # sgd only
    val_fraction: float = 0.2  # 0: no validation
    val_tiles: int = 8  # fixed validation tiles per validation image or strip
    seed: int = 0
    deterministic: bool = False
    # tf.distribute (unetcell.distribute): batch_size is per replica, so a step sees
    # batch_size x replicas tiles.
    strategy: str = "auto"  # auto | default | mirrored | multi-worker
    mixed_precision: str = "off"  # off | bfloat16 | float16: compute dtype; variables stay float32
    # Pick predict.threshold, min_size and watershed_h on the validation images at the end.
    tune_postprocessing: bool = True
    # Measure the class balance's shift of the foreground logit on the masks and store it
    # (predict.balance_shift), so predict gives calibrated probabilities; false: raw output.
    calibrate: bool = True

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, f"train.epochs must be >= 1. Received: {self.epochs}")
        _check(self.steps_per_epoch >= 1, f"train.steps_per_epoch must be >= 1. Received: {self.steps_per_epoch}")
        _check(self.batch_size >= 1, f"train.batch_size must be >= 1. Received: {self.batch_size}")
        _check(self.tile >= 8, f"train.tile must be >= 8. Received: {self.tile}")
        _check(
            self.optimizer in ("adam", "sgd"),
            f"train.optimizer must be 'adam' or 'sgd'. Received: {self.optimizer!r}",
        )
        _check(self.learning_rate > 0, f"train.learning_rate must be > 0. Received: {self.learning_rate}")
        _check(
            self.schedule in SCHEDULES,
            f"train.schedule must be {' or '.join(map(repr, SCHEDULES))}. Received: {self.schedule!r}",
        )
        _check(0 <= self.val_fraction < 1, f"train.val_fraction must be in [0, 1). Received: {self.val_fraction}")
        _check(
            self.strategy in ("auto", "default", "mirrored", "multi-worker"),
            "train.strategy must be 'auto', 'default', 'mirrored' or 'multi-worker'. "
            f"Received: {self.strategy!r}",
        )
        _check(
            self.mixed_precision in ("off", "bfloat16", "float16"),
            f"train.mixed_precision must be 'off', 'bfloat16' or 'float16'. Received: {self.mixed_precision!r}",
        )


@dataclass(frozen=True)
class PredictConfig:
    """Overlap-tile prediction and the step from probabilities to instances."""

    tile: int = 0  # input tile edge; 0 picks the default for the model's depth
    batch_size: int = 4
    # Foreground probability, of the calibrated map (balance_shift below): 0.5 is the
    # threshold of fewest pixel errors. On the uncalibrated maps of round 1 a threshold of 0.7
    # split more touching nuclei; that was the class balance's shift undone by hand (README).
    threshold: float = 0.5
    min_size: int = 16  # instances smaller than this (pixels) are dropped
    # ... and smaller than this fraction of the smallest annotated cells (the 1st percentile
    # of the training masks' cell areas, measured when training starts): the network's false
    # positives on debris are far smaller than the cells a user annotates (README, Accuracy).
    # 0 keeps min_size alone.
    min_size_fraction: float = 0.25
    # watershed: split the thresholded foreground at the necks between touching cells
    # (README, Accuracy); components: the paper's connected components; interiors: for a
    # three-class model (targets.kind), the cell interiors above the threshold grown into the
    # foreground (set by training such a model).
    instances: str = "watershed"
    # Pixels a peak of the distance to the background must rise above the neck to its
    # neighbour to be a cell of its own (the h of the h-maxima markers).
    watershed_h: float = 0.5
    # ... and this fraction of the cell's half-width: large cells need deeper necks.
    watershed_ratio: float = 0.1
    tta: bool = False  # average the 8 flips and 90-degree rotations of each image
    # The logit by which training's class-balance term (targets.balance) raised the foreground:
    # log(w_fg / w_bg) over the training masks, measured when training starts and stored with
    # the model. Probabilities are given with it divided out, calibrated to the masks' class
    # frequencies (tiling.calibrated); 0 gives the network's output as it is (models saved
    # before it was measured).
    balance_shift: float = 0.0

    def __post_init__(self) -> None:
        _check(self.tile >= 0, f"predict.tile must be >= 0. Received: {self.tile}")
        _check(self.batch_size >= 1, f"predict.batch_size must be >= 1. Received: {self.batch_size}")
        _check(0 < self.threshold < 1, f"predict.threshold must be in (0, 1). Received: {self.threshold}")
        _check(self.min_size >= 0, f"predict.min_size must be >= 0. Received: {self.min_size}")
        _check(0 <= self.min_size_fraction <= 1,
               f"predict.min_size_fraction must be in [0, 1]. Received: {self.min_size_fraction}")
        _check(
            self.instances in ("watershed", "components", "interiors"),
            f"predict.instances must be 'watershed', 'components' or 'interiors'. Received: {self.instances!r}",
        )
        _check(math.isfinite(self.balance_shift) and abs(self.balance_shift) <= 20,
               f"predict.balance_shift must be a finite logit in [-20, 20]. Received: {self.balance_shift}")
        _check(self.watershed_h >= 0, f"predict.watershed_h must be >= 0. Received: {self.watershed_h}")
        _check(0 <= self.watershed_ratio < 1,
               f"predict.watershed_ratio must be in [0, 1). Received: {self.watershed_ratio}")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    targets: TargetsConfig = field(default_factory=TargetsConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)

    def override(self, section: str, **values: Any) -> Config:
        """A copy with `values` set in `section`; None values (CLI options not given) are
        skipped, so the TOML file's settings survive unless the user overrides them."""
        values = {k: v for k, v in values.items() if v is not None}
        if not values:
            return self
        return replace(self, **{section: _section_from(section, getattr(self, section), values)})

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def for_targets(self) -> Config:
        """The network's classes and the step to instances that the targets imply: three-class
        targets need three output classes and instances grown from the interiors. Asking for
        interiors of a two-class target is refused rather than silently done another way."""
        if self.targets.kind == "three-class":
            return (self.override("model", classes=3)
                    .override("predict", instances="interiors"))
        _check(self.predict.instances != "interiors",
               "predict.instances 'interiors' needs a three-class model (targets.kind "
               "'three-class', --targets three-class); use 'watershed' or 'components'")
        return self


_SECTIONS = {f.name: f.default_factory for f in fields(Config)}  # type: ignore[misc]


def _section_from(name: str, base: Any, values: Mapping[str, Any], source: str = "") -> Any:
    where = f" in {source}" if source else ""
    known = {f.name: f for f in fields(base)}
    clean = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(
                f"unknown setting {name}.{key}{where}. Expected one of: {', '.join(known)}"
            )
        default = getattr(base, key)
        # TOML has no int/float distinction worth enforcing for floats: 1 means 1.0.
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not type(default):
            raise ConfigError(
                f"{name}.{key}{where} must be {type(default).__name__}. Received: {value!r}"
            )
        clean[key] = value
    return replace(base, **clean)


def config_from_dict(data: Mapping[str, Any], source: str = "") -> Config:
    where = f" in {source}" if source else ""
    config = Config()
    for name, values in data.items():
        if name not in _SECTIONS:
            raise ConfigError(
                f"unknown section [{name}]{where}. Expected one of: {', '.join(_SECTIONS)}"
            )
        if not isinstance(values, Mapping):
            raise ConfigError(f"[{name}]{where} must be a table of settings")
        config = replace(config, **{name: _section_from(name, getattr(config, name), values, source)})
    return config


def load_config(path: str | os.PathLike | None) -> Config:
    """The settings of a TOML file on top of the defaults (the defaults when `path` is None)."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    return config_from_dict(data, source=str(path))


def config_to_toml(config: Config) -> str:
    return tomli_w.dumps(config.to_dict())


def save_config(config: Config, path: str | os.PathLike) -> None:
    write_text_atomic(path, config_to_toml(config))
