"""From foreground probability to instances: touching cells split at the carved gap and given
the gap back, isolated cells left at their size, specks dropped."""

import numpy as np
import pytest
from scipy import ndimage

from unetcell.postprocess import drop_small, fill_gaps, fill_holes, instances, split_touching

EIGHT = np.ones((3, 3), bool)


def _disc(shape, center, radius):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius**2


def _probability(cells, seed=0):
    """A probability map: 0.6-1.0 on cells, 0.0-0.4 elsewhere (so 0.5 thresholds it exactly)."""
    rng = np.random.default_rng(seed)
    return np.where(cells, rng.uniform(0.6, 1.0, cells.shape), rng.uniform(0.0, 0.4, cells.shape)).astype(np.float32)


def _touching_discs(shape=(56, 72)):
    """Two overlapping discs split between their centres (instance labels 1 and 2), an isolated
    disc (3), and the one-pixel gap the network is taught to leave: cell 1's pixels with a cell-2
    pixel among their 8 neighbours (paper Fig. 3c)."""
    labels = np.zeros(shape, np.int32)
    a, b = _disc(shape, (24, 20), 11), _disc(shape, (27, 39), 11)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    nearer_a = np.hypot(yy - 24, xx - 20) < np.hypot(yy - 27, xx - 39)
    labels[a & (nearer_a | ~b)] = 1
    labels[b & ~(a & nearer_a)] = 2
    labels[_disc(shape, (46, 60), 6)] = 3
    gap = (labels == 1) & ndimage.binary_dilation(labels == 2, EIGHT)
    return labels, gap


def test_touching_discs_split_at_the_carved_gap_come_back_as_two_cells_with_the_gap():
    truth, gap = _touching_discs()
    assert gap.sum() >= 10
    probability = _probability((truth > 0) & ~gap)
    labels = instances(probability, threshold=0.5, min_size=10)

    assert labels.dtype == np.int32 and labels.shape == truth.shape
    assert labels.max() == 3
    for cell in (1, 2, 3):  # each cell is one 4-connected piece that covers one true cell
        _, pieces = ndimage.label(labels == cell)
        assert pieces == 1
        overlap = np.bincount(truth[labels == cell], minlength=4)
        assert overlap.argmax() == cell and overlap[cell] >= 0.95 * (truth == cell).sum()
    assert labels[gap].all()  # the gap is returned to the cells
    # Off the gap (and the two pixels around it where the discs part), the labels' foreground
    # is exactly the thresholded map: nothing else is grown or lost.
    near_gap = ndimage.binary_dilation(gap, EIGHT, iterations=2)
    np.testing.assert_array_equal((labels > 0)[~near_gap], (probability > 0.5)[~near_gap])
    np.testing.assert_array_equal(labels == 3, truth == 3)  # the isolated disc, exactly


def test_gap_pixels_go_to_the_neighbouring_cell_of_highest_probability():
    # Two rectangles side by side with a one-pixel column between them; straight edges, so
    # the result is exact: the column joins the more probable cell, nothing else changes.
    probability = np.full((30, 40), 0.1, np.float32)
    probability[5:25, 4:20] = 0.9
    probability[5:25, 20] = 0.3  # the carved gap
    probability[5:25, 21:36] = 0.7
    expected = np.zeros((30, 40), np.int32)
    expected[5:25, 4:21] = 1
    expected[5:25, 21:36] = 2
    np.testing.assert_array_equal(instances(probability), expected)
    probability[5:25, 21:36] = 0.95  # now the right cell is more probable
    expected[5:25, 20] = 2
    np.testing.assert_array_equal(instances(probability), expected)


def test_an_isolated_cell_is_not_grown_around_a_notch_but_its_hole_is_filled():
    cell = _disc((40, 40), (20, 20), 12)
    cell[20, 20:] = False  # a one-pixel slit into the same cell: not a gap between two cells
    whole = cell.copy()
    cell[19:21, 10] = False  # and a hole: a dark interior, part of the cell
    probability = _probability(cell, seed=3)
    # The paper's components: the watershed would (rightly) read a slit to the centre as a
    # neck between two lobes; this is about what the gap filling grows.
    labels = instances(probability, min_size=5, method="components")
    np.testing.assert_array_equal(labels, whole.astype(np.int32))


def test_holes_enclosed_by_one_cell_are_filled_and_nothing_else():
    labels = np.zeros((30, 40), np.int32)
    labels[2:14, 2:14] = 1
    labels[5:8, 5:8] = 0  # a hole in cell 1
    labels[2:14, 16:28] = 2
    labels[2:14, 14:16] = 3  # cells touching each other leave no hole between them
    labels[20:30, 2:12] = 4
    labels[24:30, 5:8] = 0  # a bay of cell 4 open to the image border: not a hole
    labels[16:26, 20:34] = 5
    labels[16:26, 34:38] = 6
    labels[19:23, 30:34] = 0  # background enclosed by cells 5 and 6 together: not a hole
    labels[19:23, 34:36] = 0
    filled = fill_holes(labels)
    expected = labels.copy()
    expected[5:8, 5:8] = 1
    np.testing.assert_array_equal(filled, expected)
    assert filled.dtype == labels.dtype
    np.testing.assert_array_equal(fill_holes(np.zeros((5, 5), np.int32)), 0)


@pytest.mark.parametrize("width, filled", [(1, True), (2, True), (3, False)])
def test_gaps_up_to_two_pixels_between_two_cells_are_filled_wider_ones_are_not(width, filled):
    labels = np.zeros((12, 30), np.int32)
    labels[2:10, 2:12] = 1
    labels[2:10, 12 + width:24] = 2
    probability = np.where(labels > 0, 0.9, 0.1).astype(np.float32)
    out = fill_gaps(labels, probability)
    gap = np.s_[2:10, 12:12 + width]
    assert out[gap].all() == filled and (out[gap] > 0).any() == filled
    np.testing.assert_array_equal(out[labels > 0], labels[labels > 0])  # cells keep their pixels
    outside = np.ones(labels.shape, bool)
    outside[2:10, 2:24] = False
    assert not out[outside].any()  # nothing grows on the outer edges


def test_cells_touching_only_diagonally_stay_two_cells():
    probability = np.full((12, 12), 0.1, np.float32)
    probability[1:6, 1:6] = 0.9
    probability[6:11, 6:11] = 0.8
    labels = instances(probability, min_size=4)
    assert labels.max() == 2
    assert (labels[1:6, 1:6] == 1).all() and (labels[6:11, 6:11] == 2).all()


def test_specks_below_min_size_are_dropped_and_the_rest_numbered_in_raster_order():
    probability = np.zeros((30, 30), np.float32)
    probability[2:5, 20:25] = 0.9  # 15 pixels: a speck at min_size 16
    probability[8:12, 3:7] = 0.9  # 16 pixels: a cell
    probability[20:28, 10:18] = 0.9  # 64 pixels
    probability[15, 15] = 0.9  # one pixel
    labels = instances(probability, min_size=16)
    expected = np.zeros((30, 30), np.int32)
    expected[8:12, 3:7] = 1
    expected[20:28, 10:18] = 2
    np.testing.assert_array_equal(labels, expected)


def test_drop_small_renumbers_consecutively():
    labels = np.array([[0, 7, 7, 0, 3], [2, 2, 2, 0, 3], [0, 0, 5, 5, 5]], np.int32)
    expected = np.array([[0, 0, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 2, 2, 2]], np.int32)
    np.testing.assert_array_equal(drop_small(labels, 3), expected)


def test_empty_or_faint_maps_give_no_cells():
    for probability in (np.zeros((17, 23), np.float32), np.full((17, 23), 0.5, np.float32)):
        labels = instances(probability)
        assert labels.shape == (17, 23) and labels.dtype == np.int32 and not labels.any()
    specks = np.zeros((17, 23), np.float32)
    specks[3, 3] = specks[10, 10:12] = 1.0
    assert not instances(specks, min_size=3).any()


def test_a_probability_map_must_be_two_dimensional():
    with pytest.raises(ValueError, match="H x W"):
        instances(np.zeros((4, 5, 3), np.float32))


def _overlapping_discs(shape=(50, 70), offset=18, radius=11):
    """Two discs whose centres are `offset` apart along x, overlapping with no gap between
    them: one 4-connected blob with a neck. Returns the blob and each disc's pixels."""
    a = _disc(shape, (25, 24), radius)
    b = _disc(shape, (25, 24 + offset), radius)
    return a | b, a, b


def test_watershed_splits_touching_discs_that_connected_components_merge():
    blob, a, b = _overlapping_discs()
    probability = _probability(blob, seed=5)
    merged = instances(probability, method="components")
    assert merged.max() == 1  # the paper's components cannot split them: no gap
    labels = instances(probability, method="watershed")
    assert labels.max() == 2
    assert (labels > 0)[blob].all()  # the foreground is kept, only split ...
    neck = ndimage.binary_dilation(a & b, iterations=3)
    assert not ((labels > 0) & ~blob & ~neck).any()  # ... and the notches at the neck filled
    for disc in (a, b):
        only = disc & ~(a & b)  # each disc's own pixels belong to one cell
        cell = np.bincount(labels[only]).argmax()
        assert (labels[only] == cell).mean() > 0.97
    assert np.bincount(labels[a & ~b])[1:].argmax() != np.bincount(labels[b & ~a])[1:].argmax()


def test_watershed_keeps_a_convex_cell_and_an_ellipse_whole():
    yy, xx = np.mgrid[:60, :80]
    ellipse = ((yy - 30) / 9.0) ** 2 + ((xx - 40) / 30.0) ** 2 <= 1  # 3:1, no neck
    rng = np.random.default_rng(2)
    ragged = _disc((60, 80), (30, 40), 14) & (rng.uniform(size=(60, 80)) > 0.02)
    for cell in (ellipse, _disc((60, 80), (30, 40), 14), ragged):
        labels = instances(_probability(cell, seed=1), method="watershed", min_size=5)
        assert labels.max() == 1


def test_split_touching_never_merges_cells_already_apart_and_keeps_every_pixel():
    labels = np.zeros((30, 40), np.int32)
    labels[5:25, 4:20] = 1
    labels[5:25, 20:36] = 2  # touching straight edge, already two cells
    split = split_touching(labels)
    np.testing.assert_array_equal(split, labels)
    blob, a, b = _overlapping_discs(offset=16)
    split = split_touching(blob.astype(np.int32))
    assert split.max() == 2 and ((split > 0) == blob).all()
    # A high h asks for deeper necks: these discs are then one cell.
    assert split_touching(blob.astype(np.int32), h=8).max() == 1


def test_an_unknown_instance_method_is_refused():
    with pytest.raises(ValueError, match="method"):
        instances(np.zeros((8, 8), np.float32), method="magic")


def test_a_ratio_keeps_large_lobed_cells_whole_and_still_splits_touching_nuclei():
    # A large cell with two lobes 5 px deep (a whole cell in phase contrast) and two small
    # touching nuclei with a neck as deep relative to their size.
    big, _, _ = _overlapping_discs(shape=(80, 120), offset=40, radius=28)
    assert split_touching(big.astype(np.int32), h=0.5).max() == 2  # absolute h: two pieces
    assert split_touching(big.astype(np.int32), h=0.5, ratio=0.3).max() == 1
    small, _, _ = _overlapping_discs(offset=14, radius=9)
    assert split_touching(small.astype(np.int32), h=0.5, ratio=0.1).max() == 2


# --- three-class maps: instances grown from the interiors ------------------------------------


def _three_class_map(labels: np.ndarray, border: int = 2) -> np.ndarray:
    """The (foreground, interior) map a perfect three-class network gives for `labels`."""
    from unetcell.targets import INTERIOR, three_classes

    classes = three_classes(labels, gap=0, border=border)
    return np.dstack([classes != 0, classes == INTERIOR]).astype(np.float32)


def test_interiors_grow_back_into_the_touching_cells_they_came_from():
    yy, xx = np.mgrid[:40, :60]
    labels = np.zeros((40, 60), np.int32)
    labels[(yy - 20) ** 2 + (xx - 20) ** 2 <= 100] = 1
    labels[((yy - 20) ** 2 + (xx - 38) ** 2 <= 100) & (labels == 0)] = 2  # touching disc 1
    cells = instances(_three_class_map(labels), 0.5, 4, "interiors")
    assert cells.max() == 2
    assert np.array_equal(cells > 0, labels > 0)  # every foreground pixel, nothing beyond
    # The border pixels go to the cell whose interior they lean to: away from the contact,
    # each cell comes back exactly; at the contact at most the two border rings are shared.
    matched = {int(np.bincount(cells[labels == k]).argmax()) for k in (1, 2)}
    assert matched == {1, 2}
    for k in (1, 2):
        own = np.bincount(cells[labels == k], minlength=3)
        assert own.max() >= 0.95 * own.sum()
    # Connected components of the same foreground merge them: the interiors are the lever.
    assert instances(_three_class_map(labels)[..., 0], 0.5, 4, "components").max() == 1


def test_foreground_without_an_interior_is_a_cell_of_its_own_and_specks_go():
    probability = np.zeros((30, 30, 2), np.float32)
    probability[2:5, 2:5, 0] = 0.9  # too thin for an interior: kept as a cell
    probability[10:25, 10:25, 0] = 0.9
    probability[13:22, 13:22, 1] = 0.8
    probability[28, 28, 0] = 0.9  # a speck
    cells = instances(probability, 0.5, 4, "interiors")
    assert cells.max() == 2
    assert np.count_nonzero(cells) == 9 + 225
    # Other methods read the foreground of a three-class map.
    assert instances(probability, 0.5, 4, "components").max() == 2


def test_interiors_need_a_three_class_map():
    with pytest.raises(ValueError, match="three-class"):
        instances(np.zeros((8, 8), np.float32), method="interiors")
