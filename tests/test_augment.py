"""The paper's elastic deformation (section 3.1) and the training augmentation pipeline.

References are independent of the code under test: the bicubic field is recomputed here from
Keys' cubic convolution kernel, nearest resampling from numpy indexing, cell images from discs.
"""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import albumentations as A
import cv2
import numpy as np
import pytest

from unetcell.augment import (
    Augmenter,
    Blur,
    BrightnessContrast,
    ElasticDeformation,
    Gamma,
    GaussianNoise,
    build_augmenter,
    remap,
)
from unetcell.config import AugmentConfig

SIGMA = 10.0


# --- fixtures and independent references ------------------------------------------------------

def touching_discs(shape=(300, 300), n=40, seed=0, first_id=1, step=1) -> np.ndarray:
    """int32 label image of random discs that overlap (later ones win), ids first_id + k*step."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int64)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for k in range(n):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        r = rng.uniform(5, 14)
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = first_id + k * step
    return labels


def ramps(shape) -> np.ndarray:
    """H x W x 2 float32: each pixel's own x and y, so a deformed ramp reads off where each
    output pixel was sampled from."""
    h, w = shape
    y, x = np.mgrid[:h, :w].astype(np.float32)
    return np.dstack([x, y])


def keys_cubic_matrix(n_out: int, n_grid: int, a: float = -0.75) -> np.ndarray:
    """n_out x n_grid weights of cubic convolution (Keys 1981, a = -0.75) from a grid whose
    node k sits at the centre of the k-th of n_grid equal cells, edge nodes replicated."""
    def kernel(t):
        t = np.abs(t)
        return np.where(t <= 1, (a + 2) * t**3 - (a + 3) * t**2 + 1,
                        np.where(t < 2, a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a, 0.0))

    m = np.zeros((n_out, n_grid))
    for i in range(n_out):
        src = (i + 0.5) * n_grid / n_out - 0.5
        base = int(np.floor(src))
        for k in range(base - 1, base + 3):
            m[i, min(max(k, 0), n_grid - 1)] += kernel(src - k)
    return m


def reference_field(displacements: np.ndarray, shape) -> np.ndarray:
    """Bicubic interpolation of a g x g x 2 grid of displacements to H x W x 2."""
    my = keys_cubic_matrix(shape[0], displacements.shape[0])
    mx = keys_cubic_matrix(shape[1], displacements.shape[1])
    return np.stack([my @ displacements[..., c] @ mx.T for c in range(2)], axis=-1)


def reflect101(index: np.ndarray, n: int) -> np.ndarray:
    period = 2 * n - 2
    index = np.abs(index) % period
    return np.where(index >= n, period - index, index)


def elastic(seed: int, **kwargs) -> A.Compose:
    return A.Compose([ElasticDeformation(p=1.0, **kwargs)], seed=seed)


def tile(size=188, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    labels = touching_discs((size, size), n=size // 6, seed=seed)
    image = (labels > 0).astype(np.float32)[..., None] * rng.uniform(0.5, 1.2, channels).astype(np.float32)
    image += rng.normal(0, 0.05, image.shape).astype(np.float32)
    classes = (labels > 0).astype(np.uint8)
    weights = (1.0 + 9.0 * rng.random((size, size))).astype(np.float32)
    return image, classes, weights


# --- the elastic deformation ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.uint32, np.int64])
def test_elastic_deformation_never_invents_a_label(dtype):
    first, step = {np.uint8: (1, 5), np.int32: (70_000, 1), np.uint32: (2**24 + 1, 3),
                   np.int64: (2**40 + 1, 7)}[dtype]
    labels = touching_discs(n=45, seed=3, first_id=first, step=step)
    labels = labels.astype(dtype)
    out = elastic(seed=4)(image=np.zeros(labels.shape + (1,), np.float32), mask=labels)["mask"]
    assert out.dtype == labels.dtype and out.shape == labels.shape
    assert set(np.unique(out)) <= set(np.unique(labels))
    # and it really moved things: not the identity
    assert (out != labels).mean() > 0.01


def test_large_instance_ids_survive_exactly():
    # 2**24 + 1 is not a float32: a float round trip would turn it into 2**24
    labels = np.zeros((64, 64), np.int32)
    labels[10:40, 10:40] = 2**24 + 1
    labels[40:60, 20:50] = 70_001
    out = elastic(seed=1, sigma=3.0)(image=np.zeros((64, 64, 1), np.float32), mask=labels)["mask"]
    assert set(np.unique(out)) == {0, 70_001, 2**24 + 1}


@pytest.mark.parametrize("dtype", [np.bool_, np.int8, np.int32, np.uint32, np.int64, np.float32])
def test_nearest_remap_copies_the_value_at_the_rounded_position(dtype):
    rng = np.random.default_rng(0)
    h, w = 40, 50
    values = rng.integers(-(2**62), 2**62, (h, w, 3)) if dtype == np.int64 else rng.integers(0, 2**31, (h, w, 3))
    array = values.astype(dtype)
    map_xy = (ramps((h, w)) + rng.uniform(-6, 6, (h, w, 2))).astype(np.float32)
    expected = array[reflect101(np.rint(map_xy[..., 1]).astype(int), h),
                     reflect101(np.rint(map_xy[..., 0]).astype(int), w)]
    # skip exact .5 positions, where rounding conventions may differ
    ok = (np.abs(map_xy % 1 - 0.5) > 1e-3).all(axis=-1)
    out = remap(array, map_xy, cv2.INTER_NEAREST)
    assert out.dtype == array.dtype and out.shape == array.shape
    assert np.array_equal(out[ok], expected[ok])


def test_image_and_mask_move_together():
    labels = touching_discs(n=40, seed=5).astype(np.int32)
    ramp = ramps(labels.shape)[..., 0]
    agreements = []
    for seed in range(5):
        out = elastic(seed)(image=np.dstack([ramp, labels.astype(np.float32)]), mask=labels)
        inner = (slice(40, 260), slice(40, 260))
        agreements.append((np.rint(out["image"][..., 1])[inner] == out["mask"][inner]).mean())
    # linear resampling blends two labels only on the one-pixel rim of each cell
    assert min(agreements) > 0.97


def test_displacement_is_the_bicubic_interpolation_of_the_coarse_grid():
    shape = (240, 300)
    transform = ElasticDeformation(p=1.0)
    compose = A.Compose([transform], seed=8)
    out = compose(image=ramps(shape))["image"]
    measured = out - ramps(shape)
    expected = reference_field(transform.params["displacements"], shape)
    assert transform.params["displacements"].shape == (3, 3, 2)
    # where the sample position stays inside the tile (no mirroring), the ramp reads it exactly
    source = ramps(shape) + expected
    inside = ((source[..., 0] >= 0) & (source[..., 0] <= shape[1] - 1)
              & (source[..., 1] >= 0) & (source[..., 1] <= shape[0] - 1))
    assert inside.mean() > 0.8
    np.testing.assert_allclose(measured[inside], expected[inside], atol=2e-3)


def test_displacements_have_the_promised_spread():
    # grid nodes of a 297-px tile fall on pixels 49, 148 and 247 (cell centres)
    n, draws = 297, 300
    probe = [49, 98, 148]  # a node, about midway between two nodes, the centre node
    samples = np.empty((draws, len(probe), len(probe)))
    spatial_var = np.empty(draws)
    inner = slice(60, 237)
    for s in range(draws):
        disp = elastic(s, sigma=SIGMA)(image=ramps((n, n))[..., :1])["image"][..., 0] - ramps((n, n))[..., 0]
        samples[s] = disp[np.ix_(probe, probe)]
        spatial_var[s] = disp[inner, inner].var()
    # per pixel, over draws: sigma times the norm of the pixel's interpolation weights
    m = keys_cubic_matrix(n, 3)
    factor = np.linalg.norm(m[probe], axis=1)
    expected_std = SIGMA * np.outer(factor, factor)
    assert expected_std[0, 0] == pytest.approx(SIGMA) and expected_std[1, 1] < 0.8 * SIGMA
    np.testing.assert_allclose(samples.std(axis=0), expected_std, rtol=0.12)
    # over the pixels of one tile (what a single draw shows): E[var] from the same weights
    w = m[inner]
    expected_var = SIGMA**2 * ((w**2).sum(1).mean() ** 2 - (w.mean(0) @ w.mean(0)) ** 2)
    assert 2.0 < np.sqrt(expected_var) < 20.0
    assert spatial_var.mean() == pytest.approx(expected_var, rel=0.15)


def test_displacements_are_smooth():
    n = 300
    for s in range(10):
        disp = elastic(s)(image=ramps((n, n)))["image"] - ramps((n, n))
        inner = disp[40:260, 40:260]
        gy, gx = np.gradient(inner[..., 0])
        # a 3 x 3 grid over 300 px: about sigma per 100 px
        assert np.abs(gx).mean() < 0.2 and np.abs(gy).mean() < 0.2
        assert np.abs(np.gradient(inner[..., 1])).max() < 1.0  # no folds


def test_compose_seed_reproduces_the_deformation():
    labels = touching_discs((128, 128), n=20, seed=1).astype(np.int32)
    image = np.random.default_rng(0).random((128, 128, 2), dtype=np.float32)
    a = elastic(seed=21)(image=image, mask=labels)
    b = elastic(seed=21)(image=image, mask=labels)
    c = elastic(seed=22)(image=image, mask=labels)
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["mask"], b["mask"])
    assert not np.array_equal(a["image"], c["image"])


@pytest.mark.parametrize("channels", [1, 2, 3, 4, 5, 6, 9])
@pytest.mark.parametrize("interpolation", [cv2.INTER_LINEAR, cv2.INTER_CUBIC])
def test_elastic_keeps_shape_and_dtype_for_any_channel_count(channels, interpolation):
    image = np.random.default_rng(channels).random((60, 70, channels), dtype=np.float32)
    mask = (image[..., 0] > 0.5).astype(np.uint8)
    out = elastic(seed=3, interpolation=interpolation)(image=image, mask=mask)
    assert out["image"].shape == image.shape and out["image"].dtype == np.float32
    assert out["mask"].shape == mask.shape and out["mask"].dtype == np.uint8
    # every channel gets the same deformation: channel k of the output == deforming channel k alone
    single = elastic(seed=3, interpolation=interpolation)(image=image[..., -1:])["image"]
    np.testing.assert_allclose(out["image"][..., -1:], single, atol=1e-6)


def test_elastic_rejects_invalid_parameters():
    with pytest.raises(ValueError):
        ElasticDeformation(grid=1)
    with pytest.raises(ValueError):
        ElasticDeformation(sigma=-1.0)


# --- gray values ----------------------------------------------------------------------------

@pytest.mark.parametrize("transform", [BrightnessContrast(p=1), Gamma(p=1), GaussianNoise(p=1), Blur(p=1)],
                         ids=lambda t: type(t).__name__)
def test_gray_values_keep_float_data_outside_0_1(transform):
    # percentile-normalised data: some pixels below 0, some above 1
    rng = np.random.default_rng(0)
    image = np.clip(rng.normal(0.5, 0.5, (64, 64, 2)), -0.4, 1.6).astype(np.float32)
    out = A.Compose([transform], seed=1)(image=image)["image"]
    assert out.dtype == np.float32 and out.shape == image.shape
    assert np.isfinite(out).all()
    assert out.min() < -0.05 and out.max() > 1.05  # not clipped to [0, 1]


def test_gamma_is_monotone_through_zero():
    x = np.linspace(-0.5, 1.5, 201, dtype=np.float32).reshape(1, -1, 1)
    for seed in range(5):
        y = A.Compose([Gamma(p=1)], seed=seed)(image=x)["image"].ravel()
        assert np.all(np.diff(y) > 0) and np.array_equal(np.sign(y), np.sign(x.ravel()))


# --- the augmenter the tf.data pipeline calls -------------------------------------------------

def test_augmenter_keeps_shapes_and_dtypes():
    augment = build_augmenter(AugmentConfig())
    for channels in (1, 2, 3, 5):
        image, classes, weights = tile(188, channels)
        out = augment(image, classes, weights, 5)
        assert [(a.shape, a.dtype) for a in out] == [(image.shape, np.float32), (classes.shape, np.uint8),
                                                     (weights.shape, np.float32)]
        assert all(a.flags.c_contiguous for a in out)
    # non-square tiles: flips only, never a transposition
    image, classes, weights = tile(120)
    out = augment(image[:100], classes[:100], weights[:100], 1)
    assert out[0].shape == (100, 120, 1) and out[1].shape == (100, 120) and out[2].shape == (100, 120)


def test_augmenter_moves_classes_and_weights_with_the_image():
    # without gray values, an image that equals the weight map stays equal to it (same linear
    # resampling), and one that equals the classes agrees with them but on cell rims
    config = AugmentConfig(brightness_contrast_p=0, gamma_p=0, noise_p=0, blur_p=0, affine_p=1, elastic_p=1)
    augment = build_augmenter(config)
    _, classes, weights = tile(188)
    for seed in range(5):
        out_image, _, out_weights = augment(weights[..., None], classes, weights, seed)
        assert np.array_equal(out_image[..., 0], out_weights)
        out_image, out_classes, _ = augment(classes[..., None].astype(np.float32), classes, weights, seed)
        assert not np.array_equal(out_classes, classes)
        assert (np.rint(out_image[..., 0]) == out_classes).mean() > 0.97


def test_weights_are_interpolated_linearly_and_get_no_gray_values():
    config = AugmentConfig(affine_p=1, elastic_p=1, brightness_contrast_p=1, gamma_p=1, noise_p=1, blur_p=1)
    augment = build_augmenter(config)
    image, classes, weights = tile(188)
    # a weight map with steep steps (the paper's border term is up to w0 = 10 in one-pixel gaps)
    weights = np.where(classes > 0, 1.0, 0.5).astype(np.float32)
    weights[::7] = 10.0
    constant = np.full_like(weights, 3.0)
    for seed in range(5):
        out_image, out_classes, out_weights = augment(image, classes, weights, seed)
        assert weights.min() <= out_weights.min() and out_weights.max() <= weights.max()
        assert not np.allclose(out_image, image)
        # brightness, gamma, noise or blur would change a constant map; resampling cannot
        assert np.array_equal(augment(image, classes, constant, seed)[2], constant)
        assert set(np.unique(out_classes)) <= {0, 1}


def test_augmenter_is_deterministic_across_threads():
    augment = build_augmenter(AugmentConfig())
    image, classes, weights = tile(188, channels=2)
    seeds = list(range(16))
    sequential = {s: augment(image, classes, weights, s) for s in seeds}
    order = seeds * 3
    random.Random(0).shuffle(order)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda s: (s, augment(image, classes, weights, s)), order))
    for s, out in results:
        assert all(np.array_equal(a, b) for a, b in zip(out, sequential[s])), s
    # a fresh augmenter built from the same config agrees too; other seeds differ
    again = Augmenter(AugmentConfig())(image, classes, weights, 3)
    assert all(np.array_equal(a, b) for a, b in zip(again, sequential[3]))
    assert not np.array_equal(sequential[3][0], sequential[4][0])
    # numpy integers and negative seeds are accepted
    assert np.array_equal(augment(image, classes, weights, np.int64(3))[0], sequential[3][0])
    augment(image, classes, weights, -1)


def test_augmenter_applies_each_transform_independently_at_its_rate():
    # albumentations' Compose(seed=s) gives every transform the same stream, so their p-gates
    # would open together; the augmenter shares one stream instead.
    config = AugmentConfig(flip=False, affine_p=0.5, elastic_p=0.5, brightness_contrast_p=0.5,
                           gamma_p=0.5, noise_p=0.5, blur_p=0.5)
    augment = build_augmenter(config)
    image, classes, weights = tile(32)
    applied = []
    for seed in range(300):
        augment(image, classes, weights, seed)
        geometric, gray = augment._pipelines(True)  # this thread's pipelines
        applied.append([bool(t.params) for t in (*geometric.transforms, *gray.transforms)])
    applied = np.array(applied)
    assert applied.shape[1] == 6
    np.testing.assert_allclose(applied.mean(0), 0.5, atol=0.1)
    both = (applied[:, :, None] & applied[:, None, :]).mean(0)
    off_diagonal = both[~np.eye(6, dtype=bool)]
    np.testing.assert_allclose(off_diagonal, 0.25, atol=0.1)


def test_disabled_augmentation_builds_no_augmenter():
    assert build_augmenter(AugmentConfig(enabled=False)) is None


def test_build_augmenter_leaves_cv2_threads_when_asked():
    before = cv2.getNumThreads()
    build_augmenter(AugmentConfig(), cv2_threads=None)
    assert cv2.getNumThreads() == before
    build_augmenter(AugmentConfig(), cv2_threads=1)
    assert cv2.getNumThreads() == 1
    cv2.setNumThreads(before)


def test_threads_build_their_own_pipelines():
    augment = build_augmenter(AugmentConfig())
    image, classes, weights = tile(64)
    seen = []

    def work():
        augment(image, classes, weights, 0)
        seen.append(id(augment._pipelines(True)[0]))

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen)) == 3
