"""The overlap-tile strategy: a tiled prediction equals one pass over the whole mirrored image.

The plan and the stitching are checked first with a numpy stand-in for the U-Net (same size
arithmetic, 3x3 convolutions, 2x2 max pooling, so it is sensitive to the pooling grid), then
with real, tiny, randomly initialised Keras U-Nets: unpadded with up-convolutions (the paper's),
"same" padding, and bilinear / nearest up-sampling.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.lib.stride_tricks import sliding_window_view

from unetcell.config import ModelConfig
from unetcell.errors import ConfigError
from unetcell.mirror import mirror_indices
from unetcell.model import build_unet, is_valid_input_size, output_size
from unetcell.tiling import (
    AxisPlan,
    Geometry,
    TilePlan,
    foreground,
    forward_fn,
    max_stride,
    mirror_positions_tf,
    predict_tiled,
    predict_tiled_bands,
    smallest_tile,
    tile_plan,
    tiled_forward,
    whole_image_predict,
)

# Odd sizes, an image smaller than the context, one pixel high, one pixel wide.
SHAPES = [(37, 53), (131, 97), (5, 9), (1, 40), (53, 1)]


# --- a numpy U-Net for the plan and the stitching ----------------------------------------------


def stub_unet(depth, padding="valid", output="foreground"):
    """A `predict_fn` with the U-Net's geometry: per level two 3x3 convolutions (unpadded or
    zero-padded) and a 2x2 max pooling, nearest up-sampling and centre-cropped skips on the
    way up. Max pooling makes it shift-equivariant only on the 2**depth grid, like the real
    network. It refuses invalid input sizes rather than flooring them."""
    kernels = np.random.default_rng(depth).normal(0.0, 0.6, (4 * depth + 2, 3, 3))

    def conv(x, kernel):
        if padding == "same":
            x = np.pad(x, ((0, 0), (1, 1), (1, 1)))
        return np.tanh(np.einsum("bhwij,ij->bhw", sliding_window_view(x, (3, 3), axis=(1, 2)), kernel) + 0.1)

    def predict(batch):
        batch = np.asarray(batch, np.float64)
        x = batch.sum(axis=-1) if batch.ndim == 4 else batch
        height, width = x.shape[1:]
        assert is_valid_input_size(height, depth, padding) and is_valid_input_size(width, depth, padding)
        k = iter(kernels)
        skips = []
        for _ in range(depth):
            x = conv(conv(x, next(k)), next(k))
            skips.append(x)
            b, h, w = x.shape
            x = x.reshape(b, h // 2, 2, w // 2, 2).max(axis=(2, 4))
        x = conv(conv(x, next(k)), next(k))
        for skip in reversed(skips):
            x = x.repeat(2, axis=1).repeat(2, axis=2)
            top, left = (skip.shape[1] - x.shape[1]) // 2, (skip.shape[2] - x.shape[2]) // 2
            x = conv(conv(x + skip[:, top:top + x.shape[1], left:left + x.shape[2]], next(k)), next(k))
        assert x.shape[1:] == (output_size(height, depth, padding), output_size(width, depth, padding))
        probability = 1.0 / (1.0 + np.exp(-3.0 * x))
        return probability if output == "foreground" else np.stack([1.0 - probability, probability], axis=-1)

    return predict


def tiled(image, predict_fn, tile, geometry, balance=True, batch_size=4):
    plan = tile_plan(image.shape[0], image.shape[1], tile, geometry, balance)
    return np.concatenate([band for _, band in predict_tiled_bands(
        lambda a, b: image[a:b], plan, predict_fn, batch_size)], axis=0)


# --- the plan -------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    size=st.integers(1, 2500),
    depth=st.integers(1, 5),
    kind=st.sampled_from([("valid", "transpose"), ("same", "transpose"), ("valid", "bilinear"), ("valid", "nearest")]),
    extra=st.integers(0, 40),
    balance=st.booleans(),
)
def test_plan_keeps_every_output_pixel_exactly_once_from_grid_aligned_valid_windows(size, depth, kind, extra, balance):
    geometry = Geometry(depth, *kind)
    padding, grid = kind[0], 2**depth
    tile = smallest_tile(geometry) + extra * grid
    axis = tile_plan(size, 3, tile, geometry, balance).rows

    assert axis.stride % grid == 0
    assert axis.tile <= tile and is_valid_input_size(axis.tile, depth, padding)
    out = output_size(axis.tile, depth, padding)
    hits = np.zeros(size, int)
    for k in range(axis.count):
        start, stop = axis.window(k)
        src, dst = axis.keep(k)
        assert stop - start == axis.tile
        # Window origins sit on the 2**depth grid of the whole-image pass, whose input starts
        # `context` pixels before the image.
        assert (start + geometry.context) % grid == 0
        # Output pixel i of a window is image pixel start + margin + i; the kept ones have
        # `crop` pixels of output (so `context` of input) on both sides.
        assert start + geometry.margin + src.start == dst.start
        assert src.stop - src.start == dst.stop - dst.start > 0
        assert src.start >= geometry.crop and src.stop <= out - geometry.crop
        hits[dst] += 1
    np.testing.assert_array_equal(hits, 1)

    # As few tiles as `tile` allows: a tile keeps at most the largest grid multiple that fits
    # inside its output with `crop` to spare (brute force over the model's arithmetic).
    tile_out = output_size(tile, depth, padding)
    largest = max(s for s in range(grid, tile + 1, grid) if s + 2 * geometry.crop <= tile_out)
    assert max_stride(tile, geometry) == largest
    assert axis.count == -(-size // largest)
    if balance:  # the window is the smallest valid one that keeps the stride
        smaller = axis.tile - grid
        assert not (is_valid_input_size(smaller, depth, padding)
                    and output_size(smaller, depth, padding) >= axis.stride + 2 * geometry.crop)
    else:
        assert axis.tile == tile and axis.stride == largest


def test_plan_tiles_cover_the_image_in_row_major_order():
    geometry = Geometry(2)
    plan = tile_plan(37, 53, 48, geometry, balance=False)
    hits = np.zeros(plan.shape, int)
    corners = []
    for corner, _, (dst_y, dst_x) in plan.tiles():
        corners.append(corner)
        hits[dst_y, dst_x] += 1
    np.testing.assert_array_equal(hits, 1)
    assert len(corners) == plan.count == plan.rows.count * plan.cols.count
    assert corners == sorted(corners)
    assert corners[0] == (-geometry.context, -geometry.context)
    assert plan.tile_shape == (48, 48)


def test_smallest_tile_is_the_smallest_valid_tile_that_keeps_one_grid_step():
    for depth in range(1, 6):
        for kind in [("valid", "transpose"), ("same", "transpose"), ("valid", "bilinear")]:
            geometry = Geometry(depth, *kind)
            smallest = smallest_tile(geometry)
            assert is_valid_input_size(smallest, depth, kind[0])
            assert max_stride(smallest, geometry) == geometry.grid
            with pytest.raises(ConfigError, match=f"at least {smallest}"):
                max_stride(smallest - geometry.grid, geometry)
    assert smallest_tile(Geometry(4)) == 572 - 384 + 16  # the paper's 572 tile keeps 384 of 388


def test_paper_tile_steps_by_384_not_388():
    # 388 is not a multiple of 16: the paper's 572 tile keeps 384 output pixels per step.
    plan = tile_plan(1000, 1000, 572, Geometry(4), balance=False)
    assert plan.rows.stride == 384 and plan.rows.count == 3


def test_tile_plan_rejects_invalid_tiles_and_empty_images():
    with pytest.raises(ConfigError, match="nearest valid size: 572"):
        tile_plan(100, 100, 570, Geometry(4))
    with pytest.raises(ConfigError, match="too small"):
        tile_plan(100, 100, smallest_tile(Geometry(3)) - 8, Geometry(3))
    with pytest.raises(ConfigError, match="empty"):
        tile_plan(0, 10, 572, Geometry(4))


# --- stitching, with the numpy U-Net ------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    height=st.integers(1, 60),
    width=st.integers(1, 60),
    depth=st.integers(1, 3),
    padding=st.sampled_from(["valid", "same"]),
    extra=st.integers(0, 12),
    balance=st.booleans(),
    batch_size=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_stub_tiled_prediction_equals_whole_image_pass(height, width, depth, padding, extra, balance, batch_size, seed):
    geometry = Geometry(depth, padding)
    predict_fn = stub_unet(depth, padding)
    image = np.random.default_rng(seed).normal(size=(height, width, 2))
    tile = smallest_tile(geometry) + extra * geometry.grid
    whole = whole_image_predict(image, predict_fn, geometry)
    assert whole.shape == (height, width)
    # float64 in the stub: tiles and the whole pass compute each pixel the same way.
    np.testing.assert_allclose(tiled(image, predict_fn, tile, geometry, balance, batch_size), whole, rtol=0, atol=1e-12)


def test_whole_image_pass_is_the_network_on_the_mirrored_image():
    # Independent of the plan: the whole-image reference is the stub on np.pad(reflect).
    geometry = Geometry(2)
    predict_fn = stub_unet(2)
    image = np.random.default_rng(0).normal(size=(24, 28, 1))
    ctx = geometry.context  # 20: the image is larger than the context here, so np.pad can do it
    padded = np.pad(image, ((ctx, ctx), (ctx, ctx), (0, 0)), mode="reflect")
    assert is_valid_input_size(24 + 2 * ctx, 2) and is_valid_input_size(28 + 2 * ctx, 2)
    np.testing.assert_allclose(
        whole_image_predict(image, predict_fn, geometry), predict_fn(padded[None])[0], atol=1e-12)


def test_bands_stream_from_top_to_bottom_reading_only_the_rows_they_need():
    geometry = Geometry(2)
    image = np.random.default_rng(1).normal(size=(131, 97, 1))
    plan = tile_plan(131, 97, smallest_tile(geometry) + 2 * geometry.grid, geometry)
    reads, batches = [], []

    def read_rows(a, b):
        reads.append((a, b))
        return image[a:b]

    bands = list(predict_tiled_bands(read_rows, plan, stub_unet(2, output="classes"), 3, batches.append))
    assert [first for first, _ in bands] == list(range(0, 131, plan.rows.stride))
    assert all(band.shape[1:] == (97, 2) for _, band in bands)
    assert sum(band.shape[0] for _, band in bands) == 131
    assert len(reads) == plan.rows.count
    assert all(0 <= a < b <= 131 and b - a <= plan.rows.tile for a, b in reads)
    assert sum(batches) == plan.count and max(batches) == 3
    np.testing.assert_allclose(
        np.concatenate([band for _, band in bands]),
        whole_image_predict(image, stub_unet(2, output="classes"), geometry), atol=1e-12)



def test_memory_that_grows_with_the_width_is_the_rows_read_and_one_output_band():
    """Peak numpy memory per extra column of the slide, in rows of float32 of a tile: the rows
    read for one row of tiles (1) and the one output band being filled (stride / tile),
    nothing more. A mirrored copy of the rows, a row of cut tiles, a second row of them
    waiting ahead, and the band above kept until the next one's first tile scaled with the
    width too."""
    import tracemalloc

    geometry = Geometry(2)
    margin = geometry.margin

    def predict_fn(batch):  # the geometry without the arithmetic: memory is the point here
        return batch[:, margin:batch.shape[1] - margin, margin:batch.shape[2] - margin, 0] * 0.5

    def peak(width, height=600):
        image = np.random.default_rng(0).random((height, width, 1), dtype=np.float32)
        plan = tile_plan(height, width, 160, geometry)
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            for item in predict_tiled_bands(lambda a, b: image[a:b].copy(), plan, predict_fn, 4):
                del item  # a consumer that has written the band lets it go
            return tracemalloc.get_traced_memory()[1] - base, plan
        finally:
            tracemalloc.stop()

    narrow, plan = peak(1024)
    wide, _ = peak(8192)  # wide enough that the batches the threads hold are small beside it
    rows_per_column = (wide - narrow) / 7168 / (plan.rows.tile * 4)
    # 1.77 here, 1.8-2.0 with the threads' timing; 2.5-2.7 with two bands, 5.3-6.1 before.
    assert rows_per_column <= 1 + plan.rows.stride / plan.rows.tile + 0.5, rows_per_column


def test_prepare_maps_each_batch_as_normalising_the_rows_would():
    geometry = Geometry(2)
    raw = np.random.default_rng(2).integers(0, 4096, (97, 131, 1), dtype=np.uint16)
    plan = tile_plan(97, 131, smallest_tile(geometry) + 2 * geometry.grid, geometry)
    scale = lambda a: (a.astype(np.float32) - 100) / 3000  # noqa: E731
    net = stub_unet(2)
    by_rows = [b for _, b in predict_tiled_bands(lambda a, b: scale(raw[a:b]), plan, net, 3)]
    by_tiles = [b for _, b in predict_tiled_bands(lambda a, b: raw[a:b], plan, net, 3, prepare=scale)]
    assert all(np.array_equal(a, b) for a, b in zip(by_rows, by_tiles, strict=True))


def test_mirror_positions_tf_follow_the_numpy_rule():
    for n in (1, 2, 3, 7, 17):
        positions = np.arange(-60, 60 + n)
        expected = mirror_indices(-60, 60 + n, n)
        for dtype in (tf.int32, tf.int64):  # tf.shape gives int32, numpy positions int64
            got = mirror_positions_tf(tf.constant(positions, dtype), tf.constant(n)).numpy()
            np.testing.assert_array_equal(got, expected)


# --- real U-Nets ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unet():
    """Tiny U-Nets (4 filters, random He-normal weights), each built once, with their forward_fn."""
    cache = {}

    def get(depth=2, channels=1, padding="valid", upsampling="transpose"):
        key = (depth, channels, padding, upsampling)
        if key not in cache:
            keras.utils.set_random_seed(2)
            config = ModelConfig(channels=channels, filters=4, depth=depth, padding=padding,
                                 upsampling=upsampling, dropout=0.0)
            model = build_unet(config)
            assert Geometry.of_model(model) == Geometry.of_config(config)
            cache[key] = model, forward_fn(model), Geometry.of_model(model)
        return cache[key]

    return get


def image_for(shape, channels, seed=0):
    return np.random.default_rng(seed).normal(size=shape + (channels,)).astype(np.float32)


def check_tiled_equals_whole(model_fn, geometry, channels, shapes, tiles, atol):
    worst = 0.0
    for shape in shapes:
        image = image_for(shape, channels, seed=shape[0])
        whole = whole_image_predict(image, model_fn, geometry)
        assert whole.shape == shape
        for tile in tiles:
            for balance in (True, False):
                result = tiled(image, model_fn, tile, geometry, balance, batch_size=16)
                worst = max(worst, float(np.abs(result - whole).max()))
    assert worst <= atol, worst
    return worst


@pytest.mark.parametrize("depth, channels", [(2, 1), (3, 3)])
def test_tiled_prediction_equals_whole_image_pass(unet, depth, channels):
    _, model_fn, geometry = unet(depth, channels)
    # The output is not trivially constant, so agreement means something.
    assert whole_image_predict(image_for((64, 64), channels), model_fn, geometry).std() > 0.05
    smallest = smallest_tile(geometry)
    # Smallest tile (one grid step kept per tile), a few steps, and a tile bigger than every image.
    tiles = [smallest, smallest + 3 * geometry.grid, geometry.valid_tile(300)]
    # Measured: <= 1e-6 (depth 2), 0 (depth 3) on this CPU; DESIGN.md: <= 4e-6.
    check_tiled_equals_whole(model_fn, geometry, channels, SHAPES, tiles, atol=1e-5)


@pytest.mark.parametrize("depth, channels, padding, upsampling", [
    (2, 1, "same", "transpose"),
    (3, 1, "same", "transpose"),
    (2, 1, "valid", "bilinear"),
    (3, 3, "valid", "bilinear"),
    (2, 1, "valid", "nearest"),
    (2, 2, "same", "bilinear"),
])
def test_padded_or_interpolating_unets_tile_exactly_with_their_larger_context(
    unet, depth, channels, padding, upsampling
):
    _, model_fn, geometry = unet(depth, channels, padding, upsampling)
    assert geometry.crop > 0  # these networks are tiled with more context than margin
    assert whole_image_predict(image_for((64, 64), channels), model_fn, geometry).std() > 0.02
    smallest = smallest_tile(geometry)
    # Measured max |tiled - whole|: same 1.2e-7 (depth 2) / 1.2e-7 (depth 3), bilinear 1.2e-7
    # (depth 2) / 6e-7 (depth 3), nearest 2.4e-7, same + bilinear 3.6e-7: float round-off.
    check_tiled_equals_whole(
        model_fn, geometry, channels, [(37, 53), (5, 9), (53, 1)], [smallest, smallest + geometry.grid], atol=1e-5)


def test_only_shifts_on_the_pooling_grid_leave_the_prediction_unchanged(unet):
    # Why tile origins must sit on the 2**depth grid: the network itself is shift-equivariant
    # only for shifts by multiples of 2**depth (every 2x2 pooling regroups its pixels otherwise).
    _, model_fn, geometry = unet(2)
    n = geometry.valid_tile(64)
    image = image_for((n + 8, n + 8), 1)
    base = model_fn(image[None, :n, :n])[0]
    for shift in range(1, 9):
        moved = model_fn(image[None, shift:shift + n, shift:shift + n])[0]
        diff = np.abs(base[shift:, shift:] - moved[:-shift, :-shift])
        if shift % geometry.grid == 0:
            assert diff.max() <= 1e-5
        else:
            assert diff.max() > 1e-2 and np.mean(diff > 1e-4) > 0.1, (shift, diff.max())


def test_tiles_off_the_pooling_grid_would_differ_from_the_whole_image_pass(unet):
    _, model_fn, geometry = unet(2)
    tile = smallest_tile(geometry) + 2 * geometry.grid
    stride = max_stride(tile, geometry) - 1  # 11: one pixel short of the grid
    image = image_for((37, 53), 1)

    def axis(size):
        return AxisPlan(size, tile, stride, -(-size // stride), geometry.context, geometry.crop)

    plan = TilePlan(axis(37), axis(53))
    off_grid = np.concatenate([band for _, band in predict_tiled_bands(lambda a, b: image[a:b], plan, model_fn)])
    diff = np.abs(off_grid - whole_image_predict(image, model_fn, geometry))
    on = np.zeros(diff.shape, bool)  # pixels kept from tiles whose origin is on the grid
    for (top, left), _, dst in plan.tiles():
        if (top + geometry.context) % geometry.grid == 0 and (left + geometry.context) % geometry.grid == 0:
            on[dst] = True
    assert on.any() and not on.all()
    assert diff[on].max() <= 1e-5
    # Off the grid the whole tile differs, not only its seams (DESIGN.md: up to 0.22).
    assert diff[~on].max() > 1e-2 and np.mean(diff[~on] > 1e-4) > 0.3


def test_forward_fn_traces_once_for_every_tile_shape(unet):
    model, _, _ = unet(2, 1, "valid", "nearest")
    model_fn = forward_fn(model)
    for size in (44, 48, 60):
        for width in (44, 52):
            assert model_fn(np.zeros((2, size, width, 1), np.float32)).shape == (2, size - 40, width - 40)
    assert model_fn.traces() == 1
    # Bilinear resizing needs static shapes: one trace per tile shape, reused after.
    model, _, _ = unet(2, 1, "valid", "bilinear")
    fresh = forward_fn(model, output="classes")
    for size in (44, 48, 44, 48):
        assert fresh(np.zeros((1, size, size, 1), np.float32)).shape == (1, size - 40, size - 40, 2)
    assert fresh.traces() == 2


@pytest.mark.parametrize("depth, channels, upsampling, output", [
    (2, 1, "transpose", "foreground"),
    (3, 3, "transpose", "classes"),
    (2, 1, "bilinear", "foreground"),
])
def test_tiled_forward_in_a_tf_function_equals_predict_tiled_without_retracing(
    unet, depth, channels, upsampling, output
):
    model, _, geometry = unet(depth, channels, "valid", upsampling)
    model_fn = forward_fn(model, output=output)
    tile = smallest_tile(geometry) + 2 * geometry.grid

    @tf.function(input_signature=[tf.TensorSpec((None, None, channels), tf.float32)])
    def run(image):
        return tiled_forward(model, image, tile, batch_size=3, output=output)

    for shape in [(37, 53), (1, 40), (70, 23)]:
        image = image_for(shape, channels)
        expected = predict_tiled(image, model_fn, tile, geometry)
        got = run(tf.constant(image)).numpy()
        assert got.shape == expected.shape == shape + ((2,) if output == "classes" else ())
        assert np.abs(got - expected).max() <= 1e-5  # measured <= 5e-7
    assert run.experimental_get_tracing_count() == 1


def test_tiled_forward_rejects_an_invalid_tile(unet):
    model, _, _ = unet(2)
    with pytest.raises(ConfigError, match="nearest valid size"):
        tiled_forward(model, tf.zeros((10, 10, 1)), 50)


def test_foreground_is_every_class_but_background():
    probabilities = tf.nn.softmax(tf.random.stateless_normal((2, 5, 7, 3), seed=(1, 2)))
    np.testing.assert_allclose(foreground(probabilities).numpy(), 1.0 - probabilities[..., 0].numpy(), atol=1e-6)


def test_geometry_of_a_model_that_is_not_a_unet_is_an_error():
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2)])
    with pytest.raises(ConfigError, match="does not look like a U-Net"):
        Geometry.of_model(model)
