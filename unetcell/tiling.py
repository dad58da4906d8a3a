"""The overlap-tile strategy (paper section 2, Figure 2): predict an image of any size in
tiles whose outputs, stitched, equal one forward pass over the whole mirrored image.

Three facts make tiling exact, and every function here exists for one of them:

1. **Context.** An unpadded ("valid") U-Net's output lacks `margin` pixels per side against its
   input (92 at depth 4: 572 -> 388), so every output pixel sees its full receptive field and
   no blending of overlapping tiles is needed: each output pixel is computed once, from the
   same input pixels whichever tile computes it. Context missing beyond the image's border is
   extrapolated by mirroring (numpy's "reflect" rule, repeated when the image is smaller than
   the context: `unetcell.mirror`).
2. **The pooling grid.** With k 2x2 poolings the network is shift-equivariant only for shifts
   that are multiples of 2**k: shift the input by one pixel and every pooling window regroups.
   So tile origins sit on the 2**k grid of the mirrored image, i.e. the output stride between
   tiles is a multiple of 2**k. 388 is not a multiple of 16; a 572 tile therefore steps by 384
   and its last 4 output rows and columns are left unused. Off the grid, tiled and whole
   differ by up to 0.2 on 13-22 % of the pixels (DESIGN.md), not only at seams.
3. **Valid sizes.** Only some input edges are valid (`unetcell.model.valid_input_size`); an
   invalid one raises nothing in Keras and silently shifts the output.

A "same"-padded U-Net has no margin, but its zero padding disturbs every output pixel within
its receptive field of a tile edge; so does the 2x2 "same" convolution after bilinear or
nearest up-sampling in an otherwise unpadded network. Those are tiled with more context than
margin (`Geometry.context`, 8 * 2**k per side) and the output is cropped by the difference,
which makes them exact too (tested to 1e-5), at the cost of more overlap.

The functions are written over a plain `predict_fn(batch) -> batch` so that the plan and the
stitching are tested without a network; `forward_fn` wraps a Keras model in one
`tf.function` with a fixed input signature (traced once for every tile shape; XLA's
`jit_compile` was 3.4x slower on CPU), and `tiled_forward` is the whole tiled pass built from
TensorFlow ops, for a serving graph.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator

import numpy as np

from .geometry import (  # noqa: F401  (the plan lives in the keras-free geometry module)
    AxisPlan,
    Geometry,
    TilePlan,
    axis_steps,
    max_stride,
    smallest_tile,
    tile_plan,
)
from .mirror import mirror_indices
from .pipeline import in_flight, prefetch

PredictFn = Callable[[np.ndarray], np.ndarray]
RowReader = Callable[[int, int], np.ndarray]


def predict_tiled_bands(
    read_rows: RowReader,
    plan: TilePlan,
    predict_fn: PredictFn,
    batch_size: int = 4,
    on_batch: Callable[[int], None] | None = None,
    ahead: int = 2,
    parallel: int = 2,
    prepare: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Overlap-tile prediction of an image, one band of output rows at a time.

    The image is never held whole: `read_rows(start, stop)` returns its rows [start, stop) as
    an array (stop - start, W, C) ready for the network, normalised with statistics of the
    whole image (per-tile statistics would make neighbouring tiles disagree at their seams),
    or raw when `prepare` (an element-wise map such as that normalisation) is given: it is
    then applied to each batch of tiles, so the rows are held once, in their stored dtype.
    For each row of tiles of `plan` the function reads the rows those tiles need, extends them
    by mirroring above, below, left and right (numpy's reflect rule, repeated when the image is
    smaller than the context), cuts the tiles, runs them through `predict_fn` in batches of
    `batch_size` and yields `(first_row, band)`: the band's output rows (stride x W, the last
    band fewer, with whatever trailing axes `predict_fn` returns), from top to bottom.
    `on_batch(n)` is told after every batch of n tiles (a progress bar).

    `predict_fn(tiles)` maps a batch (B, tile_h, tile_w, C) to (B, tile_h - 2 * margin,
    tile_w - 2 * margin, ...), the U-Net's geometry (margin 0 for "same" padding). The result
    equals one pass over the whole mirrored image (`whole_image_predict`), and so does not
    depend on the tile size, to float round-off:

    - no blending is needed: each kept output pixel is computed from its whole receptive
      field, so any tile covering it computes the same value, and the plan keeps every pixel
      from exactly one tile (overlapping inputs, disjoint outputs);
    - tile origins sit on the 2**depth grid of the mirror-extended image (strides are
      multiples of 2**depth), the only shifts under which every 2x2 max pooling groups the
      same pixels as in the whole-image pass.

    Memory is the rows read for one row of tiles (tile_h x W x C), a few batches of tiles and
    one band of output, handed on as soon as its last tile is in, so a slide streams in flat
    memory whatever its height, and what grows with its width is kept to those two bands.
    Batches are read and cut in a background thread, `ahead` batches ahead (0: all in the
    caller's thread, the same result bit for bit); `parallel` batches are in the network at
    once (`unetcell.pipeline.in_flight`; 1: one after the other, the same result bit for bit).
    """
    height, width = plan.shape
    rows, cols = plan.rows, plan.cols

    def tile_batches() -> Iterator[tuple[int, int, np.ndarray]]:
        """(row of tiles, first column, batch) for every batch, read, mirrored and cut.

        Each batch is gathered straight from the rows read for its row of tiles, the mirroring
        folded into the indices: no mirrored copy of the whole band and no row of cut tiles is
        held. Those scale with the slide's width and made peak memory grow with it (numpy peak
        +95 MiB from 2048^2 to 8192^2 at depth 2; tiny_mem in benchmarks/predict.py)."""
        col_index = mirror_indices(*cols.span, width)
        for ky in range(rows.count):
            row_index = mirror_indices(*rows.window(ky), height)
            lo, hi = int(row_index.min()), int(row_index.max()) + 1
            source = read_rows(lo, hi)
            if source.shape[:2] != (hi - lo, width):
                raise ValueError(f"read_rows({lo}, {hi}) returned shape {source.shape}")
            local_rows = (row_index - lo)[None, :, None]
            for first in range(0, cols.count, batch_size):
                ks = np.arange(first, min(first + batch_size, cols.count))
                # The band starts at column -context, so tile k's window starts at k * stride.
                local_cols = col_index[ks[:, None] * cols.stride + np.arange(cols.tile)][:, None, :]
                tiles = source[local_rows, local_cols]
                yield ky, first, tiles if prepare is None else prepare(tiles)
            del source  # not kept while the next rows are read

    def forward(item: tuple[int, int, np.ndarray]) -> tuple[int, int, int, np.ndarray]:
        ky, first, tiles = item
        return ky, first, len(tiles), np.asarray(predict_fn(tiles))

    out, stitched = None, 0
    batches = prefetch(tile_batches(), ahead)
    for ky, first, count, result in in_flight(forward, batches, parallel):
        src_y, dst_y = rows.keep(ky)
        if out is None:
            out = np.empty((dst_y.stop - dst_y.start, width) + result.shape[3:], result.dtype)
        for k, tile_out in zip(range(first, first + count), result):
            src_x, dst_x = cols.keep(k)
            out[:, dst_x] = tile_out[src_y, src_x]
        stitched += count
        if on_batch is not None:
            on_batch(count)
        if stitched == cols.count:
            # Handed on as soon as its last tile is in, so that the consumer (the writer) is
            # done with it before the next row's band is allocated: one band alive, not two.
            band, out, stitched = out, None, 0
            yield dst_y.start, band
            del band


def predict_tiled(
    image: np.ndarray, predict_fn: PredictFn, tile: int, geometry: Geometry, batch_size: int = 4,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Overlap-tile prediction of an image held in memory (H x W x C, ready for the network):
    the bands of `predict_tiled_bands` stacked to H x W (x trailing axes of predict_fn)."""
    plan = tile_plan(image.shape[0], image.shape[1], tile, geometry)
    bands = predict_tiled_bands(lambda a, b: image[a:b], plan, predict_fn, batch_size, on_batch)
    return np.concatenate([band for _, band in bands], axis=0)


def whole_image_predict(image: np.ndarray, predict_fn: PredictFn, geometry: Geometry) -> np.ndarray:
    """What tiling must equal: one `predict_fn` call on the whole image, mirror-extended by the
    context on the top and left and by enough on the bottom and right for a valid input size,
    with the output cropped back to H x W. (A reference for tests and small images.)"""
    height, width = image.shape[:2]
    ctx, crop, grid = geometry.context, geometry.crop, geometry.grid
    size_h = geometry.valid_tile(-(-height // grid) * grid + 2 * ctx, "up")
    size_w = geometry.valid_tile(-(-width // grid) * grid + 2 * ctx, "up")
    padded = image[mirror_indices(-ctx, size_h - ctx, height)][:, mirror_indices(-ctx, size_w - ctx, width)]
    out = np.asarray(predict_fn(padded[None]))[0]
    return out[crop:crop + height, crop:crop + width]


# --- TensorFlow -------------------------------------------------------------------------------
# Imported lazily: the plan and the stitching above are plain numpy.


def needs_static_shapes(geometry: Geometry) -> bool:
    """Keras' bilinear UpSampling2D checks its size in Python and cannot run on a tensor whose
    height and width are unknown when traced, so such a model is traced per tile shape."""
    return geometry.upsampling not in ("transpose", "nearest")


def calibrated(probabilities, balance_shift: float = 0.0):
    """Class probabilities (..., classes) with training's class balance divided out: each
    class's probability over its weight in the loss, renormalised. With log(w_fg / w_bg) =
    `balance_shift` (`targets.balance_shift`) that multiplies background by exp(shift); the
    foreground's logit drops by exactly the shift, which undoes the prior shift the weighted
    loss taught, so 0.5 is again the threshold of fewest pixel errors. The border term is
    left in: its pull towards background between touching cells is what opens the gaps."""
    if not balance_shift:
        return probabilities
    import tensorflow as tf

    classes = tf.shape(probabilities)[-1]
    scale = 1.0 + tf.one_hot(0, classes, dtype=probabilities.dtype) * (math.exp(balance_shift) - 1.0)
    weighted = probabilities * scale
    return weighted / tf.reduce_sum(weighted, axis=-1, keepdims=True)


def foreground(probabilities):
    """The foreground probability from class probabilities (..., classes): the sum of every
    class but background (class 0), which for two classes is exactly class 1."""
    import tensorflow as tf

    return tf.reduce_sum(probabilities[..., 1:], axis=-1)


def forward_fn(model, output: str = "foreground", geometry: Geometry | None = None,
               balance_shift: float = 0.0) -> PredictFn:
    """`model` as a numpy `predict_fn` for `predict_tiled_bands`: a batch of tiles in one
    `tf.function` with a fixed input signature (any batch, height and width, so it traces once;
    no `jit_compile`, 3.4x slower on CPU).

    output: "foreground" gives (B, h, w) foreground probabilities, "classes" (B, h, w, classes),
    with training's class balance divided out (`calibrated`); "interiors", for a three-class
    model, (B, h, w, 2): the foreground and the interior (class 1) probability.
    """
    import tensorflow as tf

    if output not in ("foreground", "classes", "interiors"):
        raise ValueError(f"output must be 'foreground', 'classes' or 'interiors'. Received: {output!r}")
    geometry = geometry or Geometry.of_model(model)
    channels = int(model.input_shape[-1])

    def make(height, width):
        @tf.function(input_signature=[tf.TensorSpec((None, height, width, channels), tf.float32)])
        def run(batch):
            probabilities = calibrated(model(batch, training=False), balance_shift)
            if output == "interiors":
                return tf.stack([foreground(probabilities), probabilities[..., 1]], axis=-1)
            return foreground(probabilities) if output == "foreground" else probabilities

        return run

    traced: dict = {}
    tracing = threading.Lock()  # batches may arrive from two threads (pipeline.in_flight)
    dynamic = None if needs_static_shapes(geometry) else make(None, None)

    def predict_fn(batch: np.ndarray) -> np.ndarray:
        run = dynamic
        if run is None:
            key = batch.shape[1:3]
            with tracing:
                run = traced.get(key) or traced.setdefault(key, make(*key))
        return run(tf.convert_to_tensor(batch, tf.float32)).numpy()

    predict_fn.traces = lambda: (  # for tests: how often the graph was traced
        dynamic.experimental_get_tracing_count() if dynamic is not None else len(traced))
    return predict_fn


def mirror_positions_tf(positions, n):
    """`unetcell.mirror.mirror_indices` in TensorFlow ops: source indices in 0..n-1 for the
    positions (any shape, any integers) of a mirror-extended axis of length n."""
    import tensorflow as tf

    positions = tf.convert_to_tensor(positions)
    n = tf.cast(n, positions.dtype)  # FloorMod wants one dtype: int64 positions, int32 tf.shape
    period = tf.maximum(2 * (n - 1), 1)  # n == 1: every position maps to 0
    folded = tf.math.floormod(positions, period)
    return tf.where(folded < n, folded, period - folded)


def tiled_forward(model, image, tile: int, batch_size: int = 4, output: str = "foreground",
                  balance_shift: float = 0.0):
    """The whole overlap-tile pass as TensorFlow ops, for a `tf.function` or a serving graph.

    `image` is (H, W, C) float32, already normalised, with H and W known only at run time; the
    result is (H, W) foreground probabilities (or (H, W, classes) for output="classes"), equal
    to `predict_tiled` with `forward_fn(model, balance_shift=...)` to float round-off. The plan is `tile_plan`'s
    (balanced tiles on the 2**depth grid; fixed `tile` x `tile` windows for models that need
    static shapes); the mirrored context is an index map gathered with `tf.gather_nd`
    (`tf.pad(mode="REFLECT")` fails once the pad reaches the image size). Tiles are cut batch
    by batch inside a `tf.while_loop`, so the graph holds one batch of input tiles at a time
    (cutting every tile of an 8192^2 image at once peaked at 5 GiB); the kept outputs are
    gathered in a TensorArray and assembled at the end. For a batch of images, `tf.map_fn`.
    """
    import tensorflow as tf

    geometry = Geometry.of_model(model)
    geometry.check_tile(tile)
    ctx, crop = geometry.context, geometry.crop
    balance = not needs_static_shapes(geometry)

    image = tf.convert_to_tensor(image, tf.float32)
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    # tile_plan's own arithmetic, on the run-time height and width.
    ny, sy, th = axis_steps(height, tile, geometry, balance)
    nx, sx, tw = axis_steps(width, tile, geometry, balance)
    total = ny * nx

    def cut(first):
        index = tf.range(first, tf.minimum(first + batch_size, total))
        starts_y = index // nx * sy - ctx
        starts_x = index % nx * sx - ctx
        rows = mirror_positions_tf(starts_y[:, None] + tf.range(th)[None, :], height)
        cols = mirror_positions_tf(starts_x[:, None] + tf.range(tw)[None, :], width)
        shape = tf.stack([tf.shape(index)[0], th, tw])
        where = tf.stack([tf.broadcast_to(rows[:, :, None], shape),
                          tf.broadcast_to(cols[:, None, :], shape)], axis=-1)
        tiles = tf.gather_nd(image, where)
        if not balance:
            tiles = tf.ensure_shape(tiles, (None, tile, tile, image.shape[-1]))
        return tiles

    def body(i, kept):
        probabilities = calibrated(model(cut(i * batch_size), training=False), balance_shift)
        probabilities = probabilities[:, crop:crop + sy, crop:crop + sx]
        result = foreground(probabilities) if output == "foreground" else probabilities
        return i + 1, kept.write(i, result)

    batches = (total + batch_size - 1) // batch_size
    kept = tf.TensorArray(tf.float32, size=batches, infer_shape=False)
    _, kept = tf.while_loop(lambda i, _: i < batches, body, (tf.constant(0), kept))
    tiles = kept.concat()  # (ny * nx, sy, sx[, classes]) in row-major tile order
    trailing = tf.shape(tiles)[3:]
    canvas = tf.reshape(tiles, tf.concat([[ny, nx, sy, sx], trailing], 0))
    canvas = tf.transpose(canvas, [0, 2, 1, 3] + ([4] if output == "classes" else []))
    canvas = tf.reshape(canvas, tf.concat([[ny * sy, nx * sx], trailing], 0))
    return canvas[:height, :width]
