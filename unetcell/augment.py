"""Data augmentation (paper section 3.1): the paper's elastic deformation as an albumentations
transform, gray-value variations that leave float32 data unclipped, and the default pipeline
that the tf.data pipeline calls once per training tile.

    "we generate smooth deformations using random displacement vectors on a coarse 3 by 3
    grid. The displacements are sampled from a Gaussian distribution with 10 pixels standard
    deviation. Per-pixel displacements are then computed using bicubic interpolation."

albumentations' ElasticTransform is Simard's Gaussian-smoothed per-pixel noise and its
GridDistortion moves whole grid lines; `ElasticDeformation` is the paper's version.

Why our own gray-value transforms: albumentations 2.0 clips float32 images to [0, 1] in
RandomBrightnessContrast, GaussNoise and GaussianBlur, and RandomGamma returns NaN for negative
values. Percentile normalisation (`unetcell.normalize`) maps the 1st and 99.8th percentiles to
0 and 1, so about 1 % of the pixels lie below 0 and the brightest 0.2 % above 1: clipping them
in training only would teach the network on data that prediction never sees.
"""

from __future__ import annotations

import functools
import random
import threading
from collections.abc import Callable
from typing import Any, Literal

import albumentations as A
import cv2
import numpy as np
from albumentations.core.transforms_interface import (
    BaseTransformInitSchema,
    DualTransform,
    ImageOnlyTransform,
)
from albumentations.core.type_definitions import Targets
from pydantic import Field

from .config import AugmentConfig

__all__ = [
    "Augmenter",
    "Blur",
    "BrightnessContrast",
    "ElasticDeformation",
    "Gamma",
    "GaussianNoise",
    "build_augmenter",
    "displacement_field",
    "remap",
]

# Ranges of the gray-value variations, in units of the normalised image (0..1 between the
# normalisation percentiles). Not in AugmentConfig (yet): they are not the paper's.
BRIGHTNESS = 0.1  # added offset, uniform in [-0.1, 0.1]
CONTRAST = 0.2  # gain, uniform in [0.8, 1.2]
GAMMA = (0.8, 1.25)  # exponent, log-uniform
NOISE_STD = (0.01, 0.05)  # standard deviation of additive Gaussian noise, uniform
BLUR_SIGMA = (0.5, 1.5)  # pixels, uniform

_INTERPOLATIONS = Literal[cv2.INTER_NEAREST, cv2.INTER_LINEAR, cv2.INTER_CUBIC]
_BORDERS = Literal[cv2.BORDER_REFLECT_101, cv2.BORDER_REFLECT, cv2.BORDER_REPLICATE, cv2.BORDER_CONSTANT]

# cv2.remap interpolates these dtypes (up to 4 channels per call for cubic).
_INTERPOLABLE = frozenset(np.dtype(t) for t in (np.uint8, np.uint16, np.int16, np.float32, np.float64))
# ... and copies these with INTER_NEAREST (int32 and int8: nearest only).
_COPYABLE = _INTERPOLABLE | {np.dtype(np.int8), np.dtype(np.int32)}
_CV_MAX_CHANNELS = 4


# --- resampling ---------------------------------------------------------------------------

def _remap_channels(array: np.ndarray, map_xy: np.ndarray, interpolation: int, border_mode: int) -> np.ndarray:
    """cv2.remap of an H x W or H x W x C array of a dtype OpenCV supports, keeping its axes
    (cv2 drops a trailing axis of length 1) and cutting more than 4 channels into chunks."""
    h, w = map_xy.shape[:2]
    if array.ndim == 2:
        return cv2.remap(array, map_xy, None, interpolation, borderMode=border_mode)
    c = array.shape[2]
    if c == 2 and interpolation == cv2.INTER_LINEAR:
        # OpenCV 5 interpolates 1, 3 and 4 float channels at the exact position but 2 channels
        # on its fixed-point table (1/32 pixel): one channel at a time keeps every channel
        # count on the same, exact positions.
        return np.dstack([_remap_channels(array[..., k], map_xy, interpolation, border_mode) for k in (0, 1)])
    if c <= _CV_MAX_CHANNELS:
        out = cv2.remap(np.ascontiguousarray(array), map_xy, None, interpolation, borderMode=border_mode)
        return out.reshape(h, w, c)
    return np.concatenate(
        [_remap_channels(array[..., i:i + _CV_MAX_CHANNELS], map_xy, interpolation, border_mode)
         for i in range(0, c, _CV_MAX_CHANNELS)],
        axis=2,
    )


def remap(
    array: np.ndarray,
    map_xy: np.ndarray,
    interpolation: int = cv2.INTER_LINEAR,
    border_mode: int = cv2.BORDER_REFLECT_101,
) -> np.ndarray:
    """`array` (H x W or H x W x C, any dtype, any C) sampled at `map_xy` (H x W x 2 float32,
    source x then y of every output pixel): out[y, x] = array[map_y, map_x].

    INTER_NEAREST is a pure copy for every dtype, so a label image keeps exactly its label set:
    int32 instance ids above 2**24 (where float32 would round them), uint32, int64 and bool are
    moved as their bytes (viewed as 1 or 2 uint16/uint8 channels per value), never through
    floating point. OpenCV rounds the sample position to the nearest pixel, so a nearest-
    sampled mask stays aligned with a linearly or bicubically sampled image. Other
    interpolations of integer dtypes that OpenCV cannot interpolate go through float64 and are
    rounded back.
    """
    array = np.ascontiguousarray(array)
    map_xy = np.ascontiguousarray(map_xy, np.float32)
    if interpolation == cv2.INTER_NEAREST:
        if array.dtype in _COPYABLE:
            return _remap_channels(array, map_xy, cv2.INTER_NEAREST, border_mode)
        unit = np.uint16 if array.dtype.itemsize % 2 == 0 else np.uint8
        h, w = array.shape[:2]
        as_units = array.reshape(h, w, -1).view(unit)
        out = _remap_channels(as_units, map_xy, cv2.INTER_NEAREST, border_mode)
        return np.ascontiguousarray(out).view(array.dtype).reshape(array.shape)
    if array.dtype in _INTERPOLABLE:
        return _remap_channels(array, map_xy, interpolation, border_mode)
    out = _remap_channels(array.astype(np.float64), map_xy, interpolation, border_mode)
    if np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(array.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return out.astype(array.dtype)


@functools.lru_cache(maxsize=16)
def _identity_map(height: int, width: int) -> np.ndarray:
    """The H x W x 2 map (x, y) of every pixel to itself; read-only, shared by all threads."""
    m = np.empty((height, width, 2), np.float32)
    m[..., 0] = np.arange(width, dtype=np.float32)
    m[..., 1] = np.arange(height, dtype=np.float32)[:, None]
    m.flags.writeable = False
    return m


def displacement_field(displacements: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Per-pixel displacements (H x W x 2 float32, x then y) from the coarse grid
    `displacements` (g x g x 2) by bicubic interpolation (paper section 3.1).

    The interpolation is OpenCV's bicubic resize (Keys' cubic convolution, a = -0.75): grid
    node (i, j) sits at the centre of cell (i, j) of a g x g partition of the tile, i.e. at
    pixel ((j + 0.5) * W / g - 0.5, (i + 0.5) * H / g - 0.5), where the field equals the node's
    displacement exactly; outside the outermost nodes the grid is extended by replicating its
    edge, so the tile's border moves with its nearest nodes. Every pixel moves, with a
    standard deviation of `sigma` at the nodes and about 0.7 `sigma` midway between them. It
    costs one resize of a 3 x 3 image (0.2 ms at 572 x 572) instead of a spline evaluation
    per pixel.
    """
    h, w = shape
    return cv2.resize(np.asarray(displacements, np.float32), (w, h), interpolation=cv2.INTER_CUBIC)


# --- the paper's elastic deformation --------------------------------------------------------

class ElasticDeformation(DualTransform):
    """The paper's elastic deformation (section 3.1): displacement vectors on a coarse
    `grid` x `grid` grid drawn from a Gaussian with `sigma` pixels standard deviation,
    interpolated bicubically to every pixel (`displacement_field`), then every target
    resampled at the displaced positions with cv2.remap.

    Images (and additional targets declared as 'image') are resampled with `interpolation`;
    masks with `mask_interpolation`, INTER_NEAREST by default, which copies values and never
    invents a label (any integer dtype, ids above 255 or 2**24 included; see `remap`). The
    border is mirrored (BORDER_REFLECT_101) for every target, as the paper's overlap-tile
    strategy mirrors missing context. The displacements come from the transform's seeded
    generator, so `A.Compose([...], seed=s)` reproduces them; after a call they are in
    `self.params["displacements"]` (grid x grid x 2, x then y).

    The paper's "bicubic" is the interpolation of the displacement field. The image itself is
    resampled linearly by default: INTER_CUBIC spreads every step (a cell outline, a label
    border, the weight map's ridge) over 4 pixels with an overshoot, so a label image
    resampled bicubically agrees with its nearest-resampled mask on 96 % of the pixels against
    98 % for linear (300 x 300, 40 cells), and a weight map would leave its range. Pass
    INTER_CUBIC for sharper images when nothing continuous has to stay in range.
    """

    _targets = (Targets.IMAGE, Targets.MASK, Targets.VOLUME, Targets.MASK3D)

    class InitSchema(BaseTransformInitSchema):
        grid: int = Field(ge=2)
        sigma: float = Field(ge=0)
        interpolation: _INTERPOLATIONS
        mask_interpolation: _INTERPOLATIONS
        border_mode: _BORDERS

    def __init__(
        self,
        grid: int = 3,
        sigma: float = 10.0,
        interpolation: int = cv2.INTER_LINEAR,
        mask_interpolation: int = cv2.INTER_NEAREST,
        border_mode: int = cv2.BORDER_REFLECT_101,
        p: float = 0.5,
    ):
        super().__init__(p=p)
        self.grid = grid
        self.sigma = sigma
        self.interpolation = interpolation
        self.mask_interpolation = mask_interpolation
        self.border_mode = border_mode

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        displacements = self.random_generator.normal(0.0, self.sigma, (self.grid, self.grid, 2))
        map_xy = _identity_map(h, w) + displacement_field(displacements, (h, w))
        return {"displacements": displacements, "map_xy": map_xy}

    def apply(self, img: np.ndarray, map_xy: np.ndarray, **params: Any) -> np.ndarray:
        return remap(img, map_xy, self.interpolation, self.border_mode)

    def apply_to_mask(self, mask: np.ndarray, map_xy: np.ndarray, **params: Any) -> np.ndarray:
        return remap(mask, map_xy, self.mask_interpolation, self.border_mode)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("grid", "sigma", "interpolation", "mask_interpolation", "border_mode")


# --- gray-value variations, unclipped ---------------------------------------------------------

class BrightnessContrast(ImageOnlyTransform):
    """image * gain + offset, gain uniform in [1 - contrast, 1 + contrast] and offset uniform
    in [-brightness, brightness] (normalised units), the same for all channels. No clipping."""

    class InitSchema(BaseTransformInitSchema):
        brightness: float = Field(ge=0)
        contrast: float = Field(ge=0, lt=1)

    def __init__(self, brightness: float = BRIGHTNESS, contrast: float = CONTRAST, p: float = 0.5):
        super().__init__(p=p)
        self.brightness = brightness
        self.contrast = contrast

    def get_params(self) -> dict[str, float]:
        return {
            "gain": 1.0 + self.py_random.uniform(-self.contrast, self.contrast),
            "offset": self.py_random.uniform(-self.brightness, self.brightness),
        }

    def apply(self, img: np.ndarray, gain: float, offset: float, **params: Any) -> np.ndarray:
        return img * img.dtype.type(gain) + img.dtype.type(offset)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("brightness", "contrast")


class Gamma(ImageOnlyTransform):
    """sign(x) |x| ** gamma, gamma log-uniform in `gamma_range`: an ordinary gamma on the
    normalised range, continued as an odd function below 0 so that negative values (below the
    lower normalisation percentile) stay finite and keep their order."""

    class InitSchema(BaseTransformInitSchema):
        gamma_range: tuple[float, float]

    def __init__(self, gamma_range: tuple[float, float] = GAMMA, p: float = 0.5):
        super().__init__(p=p)
        self.gamma_range = gamma_range

    def get_params(self) -> dict[str, float]:
        low, high = np.log(self.gamma_range[0]), np.log(self.gamma_range[1])
        return {"gamma": float(np.exp(self.py_random.uniform(low, high)))}

    def apply(self, img: np.ndarray, gamma: float, **params: Any) -> np.ndarray:
        return np.copysign(np.power(np.abs(img), img.dtype.type(gamma)), img)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("gamma_range",)


class GaussianNoise(ImageOnlyTransform):
    """Additive Gaussian noise, its standard deviation uniform in `std_range` (normalised
    units), independent per pixel and channel. No clipping."""

    class InitSchema(BaseTransformInitSchema):
        std_range: tuple[float, float]

    def __init__(self, std_range: tuple[float, float] = NOISE_STD, p: float = 0.5):
        super().__init__(p=p)
        self.std_range = std_range

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        std = self.py_random.uniform(*self.std_range)
        noise = self.random_generator.standard_normal(params["shape"], dtype=np.float32)
        noise *= np.float32(std)
        return {"noise": noise}

    def apply(self, img: np.ndarray, noise: np.ndarray, **params: Any) -> np.ndarray:
        return img + noise.astype(img.dtype, copy=False)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("std_range",)


class Blur(ImageOnlyTransform):
    """Gaussian blur (an out-of-focus or wider point spread function), sigma uniform in
    `sigma_range` pixels, mirrored border. No clipping."""

    class InitSchema(BaseTransformInitSchema):
        sigma_range: tuple[float, float]

    def __init__(self, sigma_range: tuple[float, float] = BLUR_SIGMA, p: float = 0.5):
        super().__init__(p=p)
        self.sigma_range = sigma_range

    def get_params(self) -> dict[str, float]:
        return {"sigma": self.py_random.uniform(*self.sigma_range)}

    def apply(self, img: np.ndarray, sigma: float, **params: Any) -> np.ndarray:
        out = cv2.GaussianBlur(img, (0, 0), sigma, borderType=cv2.BORDER_REFLECT_101)
        return out.reshape(img.shape)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("sigma_range",)


# --- the default pipeline ---------------------------------------------------------------------

def geometric_transforms(config: AugmentConfig, square: bool = True) -> list[A.BasicTransform]:
    """Flips and 90-degree rotations, small shifts/rotations/scaling, the elastic deformation.

    Images are resampled linearly: the weight map rides along as an additional 'image' target
    (albumentations resamples all image targets alike) and must never overshoot its range,
    which bicubic resampling would do next to its steep border term. The paper's bicubic
    interpolation is that of the displacement field, which `ElasticDeformation` keeps.
    Non-square tiles get the flips only (the transposing half of D4 would swap H and W).
    """
    transforms: list[A.BasicTransform] = []
    if config.flip:
        transforms += [A.D4(p=1.0)] if square else [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
    if config.affine_p > 0:
        transforms.append(A.Affine(
            translate_percent=(-config.shift, config.shift),
            rotate=(-config.rotate, config.rotate),
            scale=(1.0 - config.scale, 1.0 + config.scale),
            interpolation=cv2.INTER_LINEAR,
            mask_interpolation=cv2.INTER_NEAREST,
            border_mode=cv2.BORDER_REFLECT_101,
            p=config.affine_p,
        ))
    if config.elastic_p > 0:
        transforms.append(ElasticDeformation(
            grid=config.elastic_grid,
            sigma=config.elastic_sigma,
            interpolation=cv2.INTER_LINEAR,
            mask_interpolation=cv2.INTER_NEAREST,
            p=config.elastic_p,
        ))
    return transforms


def gray_value_transforms(config: AugmentConfig) -> list[A.BasicTransform]:
    """Brightness and contrast, gamma, blur, then noise (optics before the sensor); the image
    only, never the targets."""
    return [
        t for t in (
            BrightnessContrast(p=config.brightness_contrast_p),
            Gamma(p=config.gamma_p),
            Blur(p=config.blur_p),
            GaussianNoise(p=config.noise_p),
        )
        if t.p > 0
    ]


class Augmenter:
    """`augmenter(image, classes, weights, seed) -> (image, classes, weights)` for one tile.

    image float32 H x W x C (any C), classes uint8 (or any integer) H x W, weights float32
    H x W; returned with the same shapes and dtypes. classes are resampled nearest (never a
    new value), weights linearly (never outside their input range) and without any gray-value
    change; both move exactly with the image.

    Thread safety and determinism: tf.data calls this from several threads at once. Each
    thread builds its own pair of albumentations Compose objects on first use (transforms
    keep per-call state in `self.params`, so they must not be shared), and every call reseeds
    them from `seed` alone, one numpy and one Python generator shared by all transforms in a
    fixed order. The output therefore depends only on the inputs and the seed, whichever
    thread runs it and whatever ran before. Reseeding costs about 15 us; building the
    Composes about 1 ms, once per thread.

    Note that `A.Compose(seed=s)` gives every transform its own generator seeded with the same
    s, so their first draws coincide (all p-gates open or shut together); sharing one
    generator through `set_random_state`, as here, avoids that.
    """

    def __init__(self, config: AugmentConfig):
        self.config = config
        self._local = threading.local()

    def _pipelines(self, square: bool) -> tuple[A.Compose, A.Compose]:
        cache = getattr(self._local, "pipelines", None)
        if cache is None:
            cache = self._local.pipelines = {}
        if square not in cache:
            cache[square] = (
                A.Compose(geometric_transforms(self.config, square), additional_targets={"weights": "image"}),
                A.Compose(gray_value_transforms(self.config)),
            )
        return cache[square]

    def __call__(
        self, image: np.ndarray, classes: np.ndarray, weights: np.ndarray, seed: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        image = np.asarray(image)
        classes = np.asarray(classes)
        weights = np.asarray(weights)
        geometric, gray = self._pipelines(image.shape[0] == image.shape[1])
        # Any integer (numpy, negative, > 2**64) is a valid seed; default_rng wants >= 0.
        seed = int(seed) % 2**64
        state = (np.random.default_rng(seed), random.Random(seed))
        geometric.set_random_state(*state)
        gray.set_random_state(*state)
        moved = geometric(image=image, mask=classes, weights=weights)
        image = gray(image=moved["image"])["image"]
        return (
            np.ascontiguousarray(image, np.float32).reshape(moved["image"].shape),
            np.ascontiguousarray(moved["mask"], classes.dtype),
            np.ascontiguousarray(moved["weights"], np.float32),
        )


AugmentFn = Callable[[np.ndarray, np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray, np.ndarray]]


def build_augmenter(config: AugmentConfig, cv2_threads: int | None = 1) -> Augmenter | None:
    """The default training augmentation, or None when `config.enabled` is False (the caller
    then skips augmentation altogether).

    `cv2_threads` sets OpenCV's thread count for the whole process (None leaves it). The
    default 1: tf.data already runs tiles in parallel, and OpenCV's own pool on top of that
    only contends with TensorFlow's intra-op threads for the same cores (2 on the reference
    machine). Results do not depend on it.
    """
    if not config.enabled:
        return None
    if cv2_threads is not None:
        cv2.setNumThreads(cv2_threads)
    return Augmenter(config)
