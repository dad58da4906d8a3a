"""The mirror rule shared by training tiles and prediction."""

import numpy as np
import pytest

from unetcell.mirror import mirror_indices, mirror_window


@pytest.mark.parametrize("n, pad", [(5, 3), (5, 4), (4, 11), (17, 300), (2, 9), (1, 4)])
def test_mirror_indices_follow_numpys_reflect_even_past_the_image(n, pad):
    axis = np.arange(n)
    expected = np.pad(axis, pad, mode="reflect") if n > 1 else np.zeros(n + 2 * pad, int)
    np.testing.assert_array_equal(axis[mirror_indices(-pad, n + pad, n)], expected)


def test_mirror_window_inside_is_a_plain_crop_and_outside_mirrors():
    a = np.arange(7 * 5).reshape(7, 5)
    np.testing.assert_array_equal(mirror_window(a, 1, 2, 3, 2), a[1:4, 2:4])
    np.testing.assert_array_equal(mirror_window(a, -3, -4, 13, 13), np.pad(a, ((3, 3), (4, 4)), mode="reflect"))
