"""The U-Net's size arithmetic and the overlap-tile plan, in plain Python (importing it loads
no Keras, TensorFlow or numpy; only `Geometry.of_model` imports Keras, to read a model's
layers), so that training, `unetcell predict` and the exported serving graph take every size
from one place.

With unpadded ("valid") convolutions every 3x3 convolution trims one pixel per side and every
2x2 pooling must see an even size, so only some input sizes are valid and the output is
smaller than the input by a fixed margin (572 -> 388 at depth 4, a margin of 92 per side).
Keras does not check this: pooling floors an odd size and the centre crop hides the
mismatch, so an invalid size silently gives a shifted, wrong output. This module owns:

- the network's arithmetic (paper section 2): `valid_input_size`, `output_size`, `margin`;
- the training tile (`TileGeometry`: an input edge and the output it is taught on);
- the overlap-tile plan (paper Figure 2; why tiles sit on the 2**depth grid is told in
  `unetcell.tiling`): `Geometry`, `tile_plan`, `axis_steps` (the same arithmetic on Python
  ints and on tensors, for the serving graph) and `default_tile`.

`unetcell.model`, `unetcell.tiling`, `unetcell.data` and `unetcell.predict` re-export these
names.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from .errors import ConfigError

_CONVS_PER_LEVEL = 2

# The architectures compared with the U-Net (`unetcell.fcn`, `unetcell.deeplab`) are zero-padded
# throughout, so their size rule is their total stride 2**depth alone: valid inputs are its
# multiples and the output has the input's size. Their tiling context is their receptive field,
# measured on the built network (`unetcell.receptive`). unet-separable has the U-Net's
# arithmetic. Their published strides (DeepLabv3+ also runs at 8: `model.depth` 3):
STRIDES = {"fcn8s": 32, "deeplabv3plus": 16}


def _trim(padding: str) -> int:
    """Pixels one level's two 3x3 convolutions remove from a size."""
    return 2 * _CONVS_PER_LEVEL if padding == "valid" else 0


def _output_or_none(input_size: int, depth: int, padding: str) -> int | None:
    trim = _trim(padding)
    size = input_size
    for _ in range(depth):
        size -= trim
        if size < 2 or size % 2:
            return None
        size //= 2
    size -= trim  # the bottom of the U
    if size < 1:
        return None
    for _ in range(depth):
        size = 2 * size - trim
        if size < 1:  # the expansive path trims too: a tiny bottom may vanish on the way up
            return None
    return size


def output_size(input_size: int, depth: int, padding: str = "valid") -> int:
    """The output edge for an input edge; raises ConfigError for an invalid input size."""
    size = _output_or_none(input_size, depth, padding)
    if size is None:
        raise ConfigError(
            f"input size {input_size} is not valid for a U-Net of depth {depth} with "
            f"{padding} padding: every 2x2 pooling must see an even size. "
            f"Nearest valid size: {valid_input_size(input_size, depth, padding)}"
        )
    return size


def is_valid_input_size(input_size: int, depth: int, padding: str = "valid") -> bool:
    return _output_or_none(input_size, depth, padding) is not None


def margin(depth: int, padding: str = "valid") -> int:
    """Pixels per side that an unpadded U-Net's output lacks against its input (92 at depth 4)."""
    # From output_size: input - output = 12 * 2**depth - 8 for two 3x3 convolutions per level.
    return 0 if padding == "same" else 6 * 2**depth - 4


def _first_valid(depth: int, padding: str) -> int:
    size = 1
    while not is_valid_input_size(size, depth, padding):
        size += 1
    return size


def valid_input_size(size: int, depth: int, padding: str = "valid", rounding: str = "nearest") -> int:
    """The valid input edge nearest to `size` (or the next one up or down).

    Valid sizes form the lattice 2**depth * k + (2 * margin mod 2**depth): 572 = 16 * 32 + 60
    at depth 4. Ties round up, and a size below the smallest valid one gives the smallest.
    """
    step = 2**depth
    first = _first_valid(depth, padding)
    if size <= first:
        return first
    below = first + (size - first) // step * step
    above = below if below == size else below + step
    if rounding == "up":
        return above
    if rounding == "down":
        return below
    return below if size - below < above - size else above


@dataclass(frozen=True)
class TileGeometry:
    """Input and output edges of training tiles for a model."""

    input: int
    output: int

    @property
    def margin(self) -> int:
        return (self.input - self.output) // 2

    @classmethod
    def for_config(cls, config) -> TileGeometry:
        """From a `unetcell.config.Config`: its train.tile rounded to the nearest valid size."""
        geometry = Geometry.of_config(config.model)
        size = geometry.valid_tile(config.train.tile)
        return cls(size, geometry.output_size(size))


@dataclass(frozen=True)
class Geometry:
    """What tiling needs to know about a network (a U-Net; FCN-8s and DeepLabv3+ below): its
    depth (2**depth is the pooling grid), its padding and up-sampling, and from them the
    context a tile needs beyond the output it keeps.

    - `margin`: pixels per side that the network's output lacks against its input (92 at
      depth 4 unpadded; 0 for "same" padding). `predict_fn` must have this geometry.
    - `context`: input pixels per side that each kept output pixel needs. For the paper's
      network (unpadded, transposed up-convolutions) it is the margin: every output pixel is
      computed from valid input only. Zero padding ("same", or the 2x2 "same" convolution after
      bilinear / nearest up-sampling) and the edge rule of bilinear resizing disturb output
      pixels up to the receptive field away from a tile edge, which measured at most
      margin + 2.2 * 2**depth (depth 1-4); such networks get 8 * 2**depth and the output is
      cropped by `crop` = context - margin, which makes them exact too.

    The architectures of `STRIDES` (FCN-8s, DeepLabv3+) have no margin and a grid of their
    output stride 2**depth (FCN-8s 32; DeepLabv3+ 16 or 8); their `context` is `receptive` (the
    receptive field's radius in pixels, measured on the built network by `Geometry.of_model`)
    rounded up to the grid.
    """

    depth: int
    padding: str = "valid"
    upsampling: str = "transpose"
    arch: str = "unet"
    receptive: int = 0  # measured radius of the receptive field (STRIDES architectures)

    @property
    def strided(self) -> bool:
        return self.arch in STRIDES

    @property
    def margin(self) -> int:
        return 0 if self.strided else margin(self.depth, self.padding)

    @property
    def grid(self) -> int:
        return 2**self.depth

    @property
    def context(self) -> int:
        if self.strided:
            if self.receptive < 1:
                raise ConfigError(f"the tiling context of {self.arch} is measured on the built "
                                  "network: use Geometry.of_model")
            return -(-self.receptive // self.grid) * self.grid
        if self.padding == "valid" and self.upsampling == "transpose":
            return self.margin
        return 8 * self.grid

    @property
    def crop(self) -> int:
        return self.context - self.margin

    def valid_tile(self, size: int, rounding: str = "nearest") -> int:
        if self.strided:
            # The multiples of the stride (the lattice below with first = grid).
            steps = {"up": -(-size // self.grid), "down": size // self.grid}.get(
                rounding, (2 * size + self.grid) // (2 * self.grid))
            return max(1, steps) * self.grid
        return valid_input_size(size, self.depth, self.padding, rounding)

    def output_size(self, input_size: int) -> int:
        """The output edge for a valid input edge."""
        if self.strided:
            self.check_tile(input_size)
            return input_size
        return output_size(input_size, self.depth, self.padding)

    def describe(self) -> str:
        """The network in words, for messages: "a depth-4 U-Net with valid padding",
        "fcn8s (stride 32)"."""
        if self.strided:
            return f"{self.arch} (stride {self.grid})"
        return f"a depth-{self.depth} U-Net with {self.padding} padding"

    def check_tile(self, tile: int) -> None:
        """ConfigError naming the nearest valid size when `tile` is not a valid input edge."""
        if self.valid_tile(tile) != tile:
            raise ConfigError(
                f"tile {tile} is not a valid input size for {self.describe()}; "
                f"nearest valid size: {self.valid_tile(tile)}"
            )

    @classmethod
    def of_config(cls, config) -> Geometry:
        """From a `unetcell.config.ModelConfig` (for FCN-8s and DeepLabv3+ without the measured
        receptive field, which needs the network: `of_model`). What FCN-8s and DeepLabv3+ make
        of depth, padding and upsampling: `unetcell.config._check_arch_settings`."""
        if config.arch == "fcn8s":
            return cls(5, "same", config.upsampling, "fcn8s")
        if config.arch == "deeplabv3plus":
            return cls(config.depth, "same", "bilinear", "deeplabv3plus")
        return cls(config.depth, config.padding, config.upsampling)  # unet-separable: the U-Net's

    @classmethod
    def of_model(cls, model) -> Geometry:
        """From a built network's layers (a U-Net's: the number of 2x2 poolings, the first
        convolution's padding, the up-sampling layers; FCN-8s and DeepLabv3+ by their layer
        names, with the measured receptive field), so a model is never tiled by a config's word."""
        import keras

        layers = {layer.name: layer for layer in model.layers}
        for arch, marker in (("fcn8s", "score_pool3"), ("deeplabv3plus", "aspp_pool")):
            if marker in layers:
                from .receptive import receptive_radius

                stride = STRIDES[arch]
                if arch == "deeplabv3plus":  # up-sampled to the low-level features' stride 4
                    stride = 4 * layers["decoder_upsample"].size[0]
                ups = [layer for layer in model.layers if isinstance(layer, keras.layers.UpSampling2D)]
                upsampling = ups[0].interpolation if ups else "transpose"
                return cls(stride.bit_length() - 1, "same", upsampling, arch,
                           receptive_radius(model, stride))
        depth = sum(isinstance(layer, keras.layers.MaxPooling2D) for layer in model.layers)
        convs = [layer for layer in model.layers
                 if isinstance(layer, (keras.layers.Conv2D, keras.layers.SeparableConv2D))]
        if depth < 1 or not convs:
            raise ConfigError(f"model {model.name!r} does not look like a U-Net, FCN-8s or DeepLabv3+ "
                              "(no pooling or convolution)")
        ups = [layer for layer in model.layers if isinstance(layer, keras.layers.UpSampling2D)]
        upsampling = ups[0].interpolation if ups else "transpose"
        return cls(depth, convs[0].padding, upsampling)


@dataclass(frozen=True)
class AxisPlan:
    """The tiles along one axis of an image of `size` pixels.

    Tile k reads the input window [k * stride - context, k * stride - context + tile) of the
    mirror-extended image and keeps the output pixels [k * stride, k * stride + stride) (the
    last tile fewer), taken from predict_fn's output starting at `crop`.
    """

    size: int  # image pixels along the axis
    tile: int  # input window edge (a valid input size)
    stride: int  # output pixels kept per tile; a multiple of 2**depth (or the one tile)
    count: int  # tiles along the axis
    context: int  # input pixels before the first kept output pixel
    crop: int  # output pixels of predict_fn before the first kept one

    def window(self, k: int) -> tuple[int, int]:
        """Input pixels [start, stop) of tile k, in image coordinates (may reach past the image)."""
        start = k * self.stride - self.context
        return start, start + self.tile

    def keep(self, k: int) -> tuple[slice, slice]:
        """(source, destination): tile k's kept output pixels and where they go in the image."""
        start = k * self.stride
        stop = min(start + self.stride, self.size)
        return slice(self.crop, self.crop + stop - start), slice(start, stop)

    @property
    def span(self) -> tuple[int, int]:
        """Input pixels [start, stop) read by all tiles together, in image coordinates."""
        return -self.context, (self.count - 1) * self.stride - self.context + self.tile


@dataclass(frozen=True)
class TilePlan:
    """The overlap-tile plan of an image: one `AxisPlan` for the rows, one for the columns."""

    rows: AxisPlan
    cols: AxisPlan

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows.size, self.cols.size

    @property
    def count(self) -> int:
        return self.rows.count * self.cols.count

    @property
    def tile_shape(self) -> tuple[int, int]:
        return self.rows.tile, self.cols.tile

    def tiles(self) -> Iterator[tuple[tuple[int, int], tuple[slice, slice], tuple[slice, slice]]]:
        """For every tile in row-major order: the input window's top-left corner (image
        coordinates, possibly negative) and the (source, destination) slices of its kept
        output. Stitching is a loop of slice assignments (the CSBDeep tile iterator's habit)."""
        for ky in range(self.rows.count):
            src_y, dst_y = self.rows.keep(ky)
            for kx in range(self.cols.count):
                src_x, dst_x = self.cols.keep(kx)
                corner = (self.rows.window(ky)[0], self.cols.window(kx)[0])
                yield corner, (src_y, src_x), (dst_y, dst_x)


def max_stride(tile: int, geometry: Geometry) -> int:
    """Output pixels a tile of edge `tile` may keep: what its context leaves, rounded down to
    the pooling grid. Raises ConfigError when that is less than one grid step."""
    stride = (tile - 2 * geometry.context) // geometry.grid * geometry.grid
    if stride < geometry.grid:
        raise ConfigError(
            f"tile {tile} is too small for {geometry.describe()}: it needs at least "
            f"{smallest_tile(geometry)}"
        )
    return stride


def smallest_tile(geometry: Geometry) -> int:
    """The smallest tile edge that keeps one grid step of output."""
    return geometry.valid_tile(geometry.grid + 2 * geometry.context, "up")


def axis_steps(size, tile: int, geometry: Geometry, balance: bool = True):
    """(count, stride, window) of the tiles along an axis of `size` pixels: the arithmetic of
    `tile_plan`, written with + - * // alone so that `size` may be a Python int (predict's
    plan) or a scalar integer tensor known only at run time (the serving graph's plan,
    `unetcell.tiling.tiled_forward`): both are this one function.

    Along the axis, as few tiles as `tile` allows; with `balance` each is then shrunk to the
    smallest valid window whose stride, rounded up to the pooling grid, still covers the axis
    (an image barely larger than one tile does not pay for two full ones).
    """
    grid, context = geometry.grid, geometry.context
    largest = max_stride(tile, geometry)
    count = (size + largest - 1) // largest
    if not balance:
        return count, largest, tile
    per_tile = (size + count - 1) // count  # ceil: the pixels each tile must keep
    stride = (per_tile + grid - 1) // grid * grid  # ... rounded up to the pooling grid
    # valid_tile(stride + 2 * context, "up") in the same operators: valid sizes are the
    # lattice first + grid * j, and stride + 2 * context >= grid + 2 * margin is never below
    # its first point (whose output is at most one grid step).
    first = geometry.valid_tile(1)
    window = first + (stride + 2 * context - first + grid - 1) // grid * grid
    return count, stride, window


def _axis_plan(size: int, tile: int, geometry: Geometry, balance: bool) -> AxisPlan:
    count, stride, window = axis_steps(size, tile, geometry, balance)
    return AxisPlan(size=size, tile=window, stride=stride, count=count,
                    context=geometry.context, crop=geometry.crop)


def tile_plan(height: int, width: int, tile: int, geometry: Geometry, balance: bool = True) -> TilePlan:
    """The overlap-tile plan for an image of height x width (paper section 2, Figure 2).

    `tile` is the largest input window edge, a valid input size for the geometry. Along each
    axis the plan uses as few tiles as `tile` allows; with `balance` it then shrinks them to
    the smallest valid window whose output stride, a multiple of 2**depth, still covers the
    axis (so an image smaller than one tile gets one small window, and tiles may be
    rectangular). Every image pixel is kept from exactly one tile.
    """
    if height < 1 or width < 1:
        raise ConfigError(f"cannot tile an empty image of {height} x {width}")
    geometry.check_tile(tile)
    return TilePlan(_axis_plan(height, tile, geometry, balance), _axis_plan(width, tile, geometry, balance))


# Output pixels kept per tile edge by default. Valid convolutions recompute the margin for
# every tile, so bigger tiles waste less: benchmarks/predict.py (depth 4, 16 filters, 2 cores)
# measured 0.43 output Mpx/s at tile 252, 1.54 at 492, 1.94 at 700, 2.03 at 876 and 2.16 at
# 1212. 512 kept pixels (tile 700 at depth 4) is within 10 % of the largest while a batch of 4
# tiles of a 64-filter network keeps its first-level maps under 0.5 GiB each.
DEFAULT_OUTPUT_EDGE = 512


def default_tile(geometry: Geometry) -> int:
    """The valid tile edge that keeps about DEFAULT_OUTPUT_EDGE output pixels per tile."""
    return geometry.valid_tile(DEFAULT_OUTPUT_EDGE + 2 * geometry.context, "up")
