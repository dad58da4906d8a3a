"""The receptive field of a built network, measured with an impulse.

A zero-padded network (FCN-8s, DeepLabv3+) has no margin: its output has the input's size, and
an output pixel near a tile edge is computed from zeros where the whole image has pixels. Tiling
is exact when every kept output pixel is at least the receptive field's radius away from its
tile's edge, so that radius is the context a tile needs. Counting it from the layers means
following every branch, dilation and up-sampling; measuring it cannot miss one: add an impulse
to one pixel of a random image and see how far the output changes. An output pixel changes only
when its receptive field contains the impulse, so the farthest changed output pixel is the
radius (the network's weights are random or trained, and a ReLU might silence the outermost
path, so the probe is repeated at a few positions of the pooling grid and the largest radius
kept). The input grows until the change stays clear of its edges; a network whose output
depends on its whole input (global pooling) is refused with a clear error.
"""

from __future__ import annotations

import numpy as np

from .errors import ConfigError

# Largest probe edge: a receptive field wider than half of it is treated as global.
MAX_PROBE = 4096

_CACHE_ATTRIBUTE = "_unetcell_receptive_radius"


def impulse_response_radius(predict, size: int, channels: int, grid: int, seed: int = 0) -> int | None:
    """The largest distance (Chebyshev, pixels) from an impulse at which `predict`'s output
    changes, over impulses at a few positions of the grid cell at the centre of a size x size
    random image; None when the change reaches within one grid step of the image's edge."""
    rng = np.random.default_rng(seed)
    image = rng.random((1, size, size, channels), np.float32)
    base = np.asarray(predict(image))[0]
    centre = size // 2 // grid * grid
    radius = 0
    for offset in sorted({0, grid // 2, grid - 1}):
        probe = image.copy()
        at = centre + offset
        probe[0, at, at, :] += 10.0
        changed = np.any(np.asarray(predict(probe))[0] != base, axis=-1)
        rows, cols = np.nonzero(changed)
        if not rows.size:
            continue
        reach = max(at - rows.min(), rows.max() - at, at - cols.min(), cols.max() - at)
        if min(rows.min(), cols.min()) < grid or max(rows.max(), cols.max()) >= size - grid:
            return None
        radius = max(radius, int(reach))
    return radius


def receptive_radius(model, grid: int) -> int:
    """The receptive field's radius of a Keras model, measured once per model object (cached
    on it: the probe costs a few forward passes over up to MAX_PROBE^2 pixels)."""
    cached = getattr(model, _CACHE_ATTRIBUTE, None)
    if cached is not None:
        return cached
    channels = int(model.input_shape[-1])

    def run(batch):  # eager: a few calls, each of a new size, would retrace a tf.function anyway
        return np.asarray(model(batch, training=False))

    size = 16 * grid
    while True:
        radius = impulse_response_radius(run, size, channels, grid)
        if radius is not None:
            break
        if size >= MAX_PROBE:
            raise ConfigError(
                f"model {model.name!r}: its output changes more than {MAX_PROBE // 2} pixels from "
                "an impulse (a global pooling?), so it cannot be tiled exactly"
            )
        size *= 2
    setattr(model, _CACHE_ATTRIBUTE, radius)
    return radius
