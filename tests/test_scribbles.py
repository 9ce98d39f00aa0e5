from __future__ import annotations

import numpy as np
import pytest
from skimage.draw import disk, ellipse
from skimage.morphology import skeletonize

from s2l_monai.data.scribbles import (
    auto_scribbles,
    branch_points,
    n_pieces_to_keep,
    scribble_stats,
    skeleton_pieces,
)
from s2l_monai.data.synthetic import synthetic_nuclei

BG, FG, UN = 0, 1, 255


@pytest.fixture
def two_discs() -> np.ndarray:
    """``HW`` instance labels: two separated discs, ids 1 and 2."""
    mask = np.zeros((64, 96), dtype=np.uint16)
    mask[disk((32, 24), 10)] = 1
    mask[disk((32, 70), 12)] = 2
    return mask


@pytest.fixture
def ellipse_grid() -> np.ndarray:
    """``HW`` instance labels: 20 separated, tilted ellipses on a 4 x 5 grid."""
    mask = np.zeros((160, 200), dtype=np.uint16)
    for index in range(20):
        row, col = divmod(index, 5)
        rr, cc = ellipse(20 + 40 * row, 20 + 40 * col, 8, 13, shape=mask.shape, rotation=0.3 * index)
        mask[rr, cc] = index + 1
    return mask


def kept_pieces(scribble: np.ndarray, mask: np.ndarray) -> tuple[int, int]:
    """Count the whole skeleton pieces a scribble keeps; fail if it keeps part of a piece or anything else.

    Args:
        scribble: ``HW`` scribble map (0/1/255).
        mask: ``HW`` mask it was made from.

    Returns:
        Numbers of kept foreground and background pieces.
    """
    counts = []
    for value, region, cut in ((FG, mask > 0, False), (BG, mask == 0, True)):
        pieces, _ = skeleton_pieces(region, cut_branches=cut)
        marked = scribble == value
        assert np.all(pieces[marked] > 0), "scribble pixels off the skeleton pieces"
        ids = np.unique(pieces[marked])
        assert np.array_equal(marked, np.isin(pieces, ids)), "a piece is only partly kept"
        counts.append(len(ids))
    return counts[0], counts[1]


def test_two_discs_ratio_one_marks_both_discs(two_discs: np.ndarray) -> None:
    scribble = auto_scribbles(two_discs, 1.0, seed=0)
    assert scribble.dtype == np.uint8 and scribble.shape == two_discs.shape
    assert set(np.unique(scribble)) == {BG, FG, UN}
    fg_marks = scribble == FG
    assert fg_marks[two_discs == 1].any() and fg_marks[two_discs == 2].any()
    assert np.array_equal(fg_marks, skeletonize(two_discs > 0))  # both pieces kept: the whole foreground skeleton
    assert not np.any((scribble == BG) & (two_discs > 0))
    assert kept_pieces(scribble, two_discs) == (2, 2)


def test_scribbles_stay_on_their_side_of_the_mask() -> None:
    for seed in range(4):
        _, labels = synthetic_nuclei((128, 128), seed=seed)
        for ratio in (0.1, 0.5, 1.0):
            scribble = auto_scribbles(labels, ratio, seed=seed)
            assert np.all(labels[scribble == FG] > 0)
            assert np.all(labels[scribble == BG] == 0)
            n_fg, n_bg = kept_pieces(scribble, labels)
            assert n_fg == n_bg > 0


@pytest.mark.parametrize(("ratio", "expected"), [(0.1, 2), (0.3, 6), (0.5, 10), (1.0, 20)])
def test_ratio_keeps_share_of_pieces_and_as_many_background(
    ellipse_grid: np.ndarray, ratio: float, expected: int
) -> None:
    assert skeleton_pieces(ellipse_grid > 0)[1] == 20
    assert skeleton_pieces(ellipse_grid == 0, cut_branches=True)[1] >= 20
    scribble = auto_scribbles(ellipse_grid, ratio, seed=3)
    assert kept_pieces(scribble, ellipse_grid) == (expected, expected)


def test_background_count_capped_at_available_pieces() -> None:
    mask = np.zeros((40, 56), dtype=np.uint8)
    for x0 in range(0, 56, 12):
        mask[:, x0 : x0 + 8] = 1  # five foreground stripes, four background strips between them
    assert skeleton_pieces(mask > 0)[1] == 5
    assert skeleton_pieces(mask == 0, cut_branches=True)[1] == 4
    scribble = auto_scribbles(mask, 1.0, seed=0)
    assert kept_pieces(scribble, mask) == (5, 4)


def test_touching_nuclei_share_one_foreground_piece() -> None:
    mask = np.zeros((40, 60), dtype=np.uint16)
    mask[ellipse(20, 20, 7, 11)] = 1
    mask[ellipse(20, 38, 7, 11)] = 2  # overlaps nucleus 1: the union is one blob
    scribble = auto_scribbles(mask, 1.0, seed=0)
    assert kept_pieces(scribble, mask)[0] == 1
    assert (scribble == FG)[mask == 1].any() and (scribble == FG)[mask == 2].any()


def test_instance_and_binary_masks_agree(ellipse_grid: np.ndarray) -> None:
    a = auto_scribbles(ellipse_grid, 0.3, seed=7)
    b = auto_scribbles(ellipse_grid > 0, 0.3, seed=7)
    c = auto_scribbles((ellipse_grid > 0).astype(np.float32), 0.3, seed=7)
    assert np.array_equal(a, b) and np.array_equal(a, c)


def test_seed_determinism(ellipse_grid: np.ndarray) -> None:
    a = auto_scribbles(ellipse_grid, 0.3, seed=11)
    assert np.array_equal(a, auto_scribbles(ellipse_grid, 0.3, seed=11))
    assert np.array_equal(a, auto_scribbles(ellipse_grid, 0.3, seed=np.random.default_rng(11)))
    b = auto_scribbles(ellipse_grid, 0.3, seed=12)
    assert not np.array_equal(a, b)
    assert kept_pieces(a, ellipse_grid) == kept_pieces(b, ellipse_grid) == (6, 6)


def test_custom_values() -> None:
    _, labels = synthetic_nuclei((96, 96), seed=1)
    scribble = auto_scribbles(labels, 0.5, seed=0, background=2, foreground=1, unlabelled=250)
    assert set(np.unique(scribble)) == {1, 2, 250}
    default = auto_scribbles(labels, 0.5, seed=0)
    assert np.array_equal(scribble == 2, default == BG) and np.array_equal(scribble == 1, default == FG)


def test_empty_and_full_masks() -> None:
    empty = auto_scribbles(np.zeros((40, 50), dtype=np.uint8), 0.5, seed=0)
    assert set(np.unique(empty)) == {BG, UN}  # no nuclei: a share of the background pieces only
    full = auto_scribbles(np.ones((40, 50), dtype=np.uint8), 0.5, seed=0)
    assert set(np.unique(full)) == {FG, UN}


def test_typical_coverage_is_small() -> None:
    fractions = []
    for seed in range(4):
        _, labels = synthetic_nuclei(seed=seed)
        stats = scribble_stats(auto_scribbles(labels, 0.3, seed=seed))
        assert stats["foreground"] > 0 and stats["background"] > 0
        fractions.append(stats["labelled_fraction"])
    assert 0.0005 < np.mean(fractions) < 0.03  # thin skeleton pieces, far from the whole background


@pytest.mark.parametrize(
    ("mask", "ratio", "kwargs", "message"),
    [
        (np.zeros((4, 8, 8)), 0.5, {}, "2D"),
        (np.zeros(8), 0.5, {}, "2D"),
        (np.zeros((0, 8)), 0.5, {}, "empty"),
        (np.array([["a", "b"], ["c", "d"]]), 0.5, {}, "numeric"),
        (np.zeros((8, 8)), 0.0, {}, "ratio"),
        (np.zeros((8, 8)), -0.1, {}, "ratio"),
        (np.zeros((8, 8)), 1.5, {}, "ratio"),
        (np.zeros((8, 8)), float("nan"), {}, "ratio"),
        (np.zeros((8, 8)), 0.5, {"unlabelled": 1}, "distinct"),
        (np.zeros((8, 8)), 0.5, {"unlabelled": 256}, "0..255"),
    ],
)
def test_bad_input_raises(mask: np.ndarray, ratio: float, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        auto_scribbles(mask, ratio, **kwargs)


def test_branch_points_cut_a_cross_into_arms() -> None:
    cross = np.zeros((11, 11), dtype=bool)
    cross[5, 1:10] = True
    cross[1:10, 5] = True
    points = branch_points(cross)
    assert points[5, 5] and points.sum() == 5  # the centre and its four arm neighbours (mutually diagonal)
    pieces, n = skeleton_pieces(cross, cut_branches=True)
    assert n == 4
    line = np.zeros((5, 9), dtype=bool)
    line[2, 1:8] = True
    assert not branch_points(line).any()


def test_n_pieces_to_keep() -> None:
    assert n_pieces_to_keep(0, 0.5) == 0
    assert n_pieces_to_keep(3, 0.1) == 1  # at least one
    assert n_pieces_to_keep(25, 0.1) == 3  # 2.5 rounds half up
    assert n_pieces_to_keep(20, 0.3) == 6
    assert n_pieces_to_keep(7, 1.0) == 7


def test_scribble_stats() -> None:
    scribble = np.full((4, 5), UN, dtype=np.uint8)
    scribble[0, :3] = FG
    scribble[1, :2] = BG
    scribble[3, 4] = 7
    stats = scribble_stats(scribble)
    assert stats == {
        "foreground": 3,
        "background": 2,
        "unlabelled": 14,
        "other": 1,
        "total": 20,
        "labelled_fraction": 0.25,
    }
    assert scribble_stats(scribble, unlabelled=250)["other"] == 15
