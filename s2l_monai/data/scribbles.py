"""Automatic scribbles from a full mask (Scribble2Label, Table 2; after Wu et al.).

The rule: skeletonise the foreground (the union of all nuclei); skeletonise the background and cut its skeleton at
its branch points; split each skeleton into 8-connected pieces; keep a random share ``ratio`` of the foreground
pieces and the same number of background pieces. Every other pixel is unlabelled.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.measure import label as label_components
from skimage.morphology import skeletonize

__all__ = ["auto_scribbles", "branch_points", "n_pieces_to_keep", "scribble_stats", "skeleton_pieces"]

_EIGHT_CONNECTED = np.ones((3, 3), dtype=np.uint8)


def _validate_values(background: int, foreground: int, unlabelled: int) -> None:
    """Check that the three scribble values are distinct uint8 values.

    Raises:
        ValueError: if a value is outside 0..255 or two values coincide.
    """
    values = {"background": background, "foreground": foreground, "unlabelled": unlabelled}
    for name, value in values.items():
        if not 0 <= int(value) <= 255:
            raise ValueError(f"{name} value must be in 0..255 to fit a uint8 scribble map, got {value}")
    if len(set(values.values())) != 3:
        raise ValueError(f"background, foreground and unlabelled values must be distinct, got {values}")


def _validate_mask(mask: np.ndarray) -> np.ndarray:
    """Return the foreground of ``mask`` after checking it is a non-empty 2D numeric array.

    Args:
        mask: ``HW`` instance label map (0 = background, >0 = nucleus ids) or binary mask.

    Returns:
        ``HW`` bool foreground (``mask > 0``).

    Raises:
        ValueError: if ``mask`` is not 2D, is empty, or is not boolean/numeric.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be a 2D (HW) array, got shape {mask.shape}")
    if mask.size == 0:
        raise ValueError("mask must not be empty")
    if not (mask.dtype == bool or np.issubdtype(mask.dtype, np.number)):
        raise ValueError(f"mask must be boolean or numeric, got dtype {mask.dtype}")
    return mask > 0


def branch_points(skeleton: np.ndarray) -> np.ndarray:
    """Find the branch (corner) points of a skeleton.

    Args:
        skeleton: ``HW`` bool one-pixel-wide skeleton.

    Returns:
        ``HW`` bool map of skeleton pixels with more than two skeleton neighbours (8-connectivity).
    """
    skeleton = np.asarray(skeleton, dtype=bool)
    kernel = _EIGHT_CONNECTED.copy()
    kernel[1, 1] = 0
    neighbours = ndimage.convolve(skeleton.astype(np.uint8), kernel, mode="constant", cval=0)
    return skeleton & (neighbours > 2)


def skeleton_pieces(region: np.ndarray, *, cut_branches: bool = False) -> tuple[np.ndarray, int]:
    """Skeletonise a region and split the skeleton into 8-connected pieces.

    Args:
        region: ``HW`` bool region to skeletonise.
        cut_branches: remove the skeleton's branch points first, so that every branch becomes its own piece.

    Returns:
        ``HW`` int32 label map of the pieces (0 = not on a kept skeleton pixel, 1..n = piece ids in raster order)
        and the number of pieces ``n``.
    """
    skeleton = skeletonize(np.asarray(region, dtype=bool))
    if cut_branches:
        skeleton &= ~branch_points(skeleton)
    pieces, n = label_components(skeleton, connectivity=2, return_num=True)
    return pieces.astype(np.int32, copy=False), int(n)


def n_pieces_to_keep(n_pieces: int, ratio: float) -> int:
    """Number of pieces kept for a share ``ratio``: ``ratio * n_pieces`` rounded half up, at least one if any exist.

    Args:
        n_pieces: number of available pieces.
        ratio: share to keep, ``0 < ratio <= 1``.

    Returns:
        The count, between ``min(1, n_pieces)`` and ``n_pieces``.
    """
    if n_pieces <= 0:
        return 0
    return int(min(n_pieces, max(1, np.floor(ratio * n_pieces + 0.5))))


def _choose(pieces: np.ndarray, n_pieces: int, n_keep: int, rng: np.random.Generator) -> np.ndarray:
    """Pick ``n_keep`` of the ``n_pieces`` labelled pieces at random.

    Args:
        pieces: ``HW`` label map of pieces, ids 1..n_pieces.
        n_pieces: number of pieces.
        n_keep: how many to keep (capped at ``n_pieces``).
        rng: random generator.

    Returns:
        ``HW`` bool map of the pixels of the chosen pieces.
    """
    n_keep = min(n_keep, n_pieces)
    if n_keep <= 0:
        return np.zeros(pieces.shape, dtype=bool)
    chosen = rng.choice(np.arange(1, n_pieces + 1), size=n_keep, replace=False)
    return np.isin(pieces, chosen)


def auto_scribbles(
    mask: np.ndarray,
    ratio: float,
    seed: int | np.random.Generator = 0,
    *,
    background: int = 0,
    foreground: int = 1,
    unlabelled: int = 255,
) -> np.ndarray:
    """Make a scribble map from a full mask, as the paper's automatic scribbles.

    The foreground (union of all nuclei, so touching nuclei may share a piece) is skeletonised and split into
    8-connected pieces; the background is skeletonised, its branch points are removed and it is split likewise.
    ``n_pieces_to_keep(n_fg, ratio)`` random foreground pieces are kept and the same number of background pieces
    (capped at how many exist). Where the mask has no foreground at all, the share ``ratio`` of the background
    pieces is kept instead, so that an empty image still carries some background scribble.

    Args:
        mask: ``HW`` instance label map (0 = background, >0 = nucleus ids) or binary mask.
        ratio: share of foreground pieces to keep, ``0 < ratio <= 1`` (paper: 0.1, 0.3, 0.5, 1.0).
        seed: seed or generator for the random choice of pieces; the same seed gives the same scribbles.
        background: value written on background scribble pixels.
        foreground: value written on foreground scribble pixels.
        unlabelled: value of every other pixel.

    Returns:
        ``HW`` uint8 scribble map.

    Raises:
        ValueError: if ``mask`` is not a non-empty 2D array, ``ratio`` is not in (0, 1], or the values are not
            distinct uint8 values.
    """
    fg = _validate_mask(mask)
    if not np.isfinite(ratio) or not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must satisfy 0 < ratio <= 1, got {ratio}")
    _validate_values(background, foreground, unlabelled)
    rng = np.random.default_rng(seed)

    fg_pieces, n_fg = skeleton_pieces(fg)
    bg_pieces, n_bg = skeleton_pieces(~fg, cut_branches=True)
    n_keep_fg = n_pieces_to_keep(n_fg, ratio)
    n_keep_bg = n_keep_fg if n_fg > 0 else n_pieces_to_keep(n_bg, ratio)

    scribble = np.full(fg.shape, unlabelled, dtype=np.uint8)
    scribble[_choose(fg_pieces, n_fg, n_keep_fg, rng)] = foreground
    scribble[_choose(bg_pieces, n_bg, n_keep_bg, rng)] = background
    return scribble


def scribble_stats(
    scribble: np.ndarray, *, background: int = 0, foreground: int = 1, unlabelled: int = 255
) -> dict[str, int | float]:
    """Count the pixels of each class in a scribble map.

    Args:
        scribble: ``HW`` (or any shape) scribble map.
        background: value of background scribble pixels.
        foreground: value of foreground scribble pixels.
        unlabelled: value of unlabelled pixels.

    Returns:
        ``{"foreground", "background", "unlabelled", "other", "total"}`` pixel counts (``other`` counts values that
        are none of the three, which a valid map has none of) and ``"labelled_fraction"``, the share of pixels that
        are foreground or background.
    """
    scribble = np.asarray(scribble)
    n_fg = int(np.count_nonzero(scribble == foreground))
    n_bg = int(np.count_nonzero(scribble == background))
    n_un = int(np.count_nonzero(scribble == unlabelled))
    total = int(scribble.size)
    return {
        "foreground": n_fg,
        "background": n_bg,
        "unlabelled": n_un,
        "other": total - n_fg - n_bg - n_un,
        "total": total,
        "labelled_fraction": (n_fg + n_bg) / total if total else 0.0,
    }
