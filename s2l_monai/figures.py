"""Pictures that let users watch the pseudo-labels grow (after the paper's Fig. 1)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["heat", "pseudo_label_figure", "save_pseudo_label_figure", "to_display"]

FOREGROUND_SCRIBBLE = (255, 215, 0)  # gold
BACKGROUND_SCRIBBLE = (0, 160, 255)  # azure
BELOW_TAU = (220, 30, 30)  # red
#: anchors of the uncertainty colour scale (black -> purple -> red -> orange -> pale yellow, after "inferno")
_HEAT_STOPS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_HEAT_RGB = np.array([(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)], dtype=np.float32)


def to_display(image: np.ndarray) -> np.ndarray:
    """Scale an image ``HW``, ``1HW`` or ``3HW`` (any range) to uint8 RGB ``HW3`` by its 1st-99.8th percentiles."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3:
        image = np.repeat(image, 3, axis=0) if image.shape[0] == 1 else image[:3]
        image = np.moveaxis(image, 0, -1)
    else:
        image = np.repeat(image[..., None], 3, axis=-1)
    lo, hi = np.percentile(image, (1.0, 99.8))
    scaled = (image - lo) / max(float(hi - lo), 1e-6)
    return (np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)


_HEAT_LUT = np.stack([np.interp(np.linspace(0.0, 1.0, 256), _HEAT_STOPS, _HEAT_RGB[:, c]) for c in range(3)],
                     axis=-1).round().astype(np.uint8)


def heat(values: np.ndarray) -> np.ndarray:
    """Values ``HW`` in ``[0, 1]`` as uint8 RGB ``HW3`` on a perceptually ordered dark-to-bright scale (256 steps)."""
    v = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)
    return _HEAT_LUT[(v * 255.0 + 0.5).astype(np.uint8)]


def _draw_scribbles(rgb: np.ndarray, scribble: np.ndarray, unlabelled: int) -> np.ndarray:
    out = rgb.copy()
    out[scribble == 0] = BACKGROUND_SCRIBBLE
    out[(scribble != 0) & (scribble != unlabelled)] = FOREGROUND_SCRIBBLE
    return out


def pseudo_label_figure(
    image: np.ndarray,
    scribble: np.ndarray,
    prob: np.ndarray,
    tau: float = 0.8,
    unlabelled: int = 255,
    uncertainty: np.ndarray | None = None,
) -> np.ndarray:
    """Side-by-side picture: the image with its scribbles, the filtered pseudo-label, and the uncertainty.

    Left: the image with foreground scribbles in gold and background scribbles in azure. Right: the pseudo-label
    ``argmax y`` where ``max y > tau`` in white (foreground) / black (background), pixels below ``tau`` in red, the
    scribbles drawn on top (paper Fig. 1). With ``uncertainty``, a third panel shows it from black (certain) to pale
    yellow (:func:`heat`; :mod:`s2l_monai.uncertainty`): where one more stroke would help most.

    Args:
        image: ``HW``, ``1HW`` or ``3HW``.
        scribble: ``HW`` class indices, ``unlabelled`` elsewhere.
        prob: averaged probabilities ``CHW``.
        tau: consistency threshold.
        unlabelled: scribble value of unlabelled pixels.
        uncertainty: ``HW`` in ``[0, 1]``, or None for two panels.

    Returns:
        uint8 RGB ``H(2W+4)3`` (``H(3W+8)3`` with ``uncertainty``).
    """
    rgb = to_display(image)
    confidence, hard = prob.max(0), prob.argmax(0)
    pseudo = np.where(hard[..., None] > 0, np.uint8(255), np.uint8(0)).repeat(3, axis=-1)
    pseudo[confidence <= tau] = BELOW_TAU
    gap = np.full((rgb.shape[0], 4, 3), 128, dtype=np.uint8)
    panels = [_draw_scribbles(rgb, scribble, unlabelled), gap, _draw_scribbles(pseudo, scribble, unlabelled)]
    if uncertainty is not None:
        panels += [gap, heat(uncertainty)]
    return np.concatenate(panels, axis=1)


def save_pseudo_label_figure(path: str | os.PathLike, *args, **kwargs) -> Path:
    """Write :func:`pseudo_label_figure` as a PNG (folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # zlib level 3: on these pictures about half the time of the default level 6, and smaller files (measured)
    Image.fromarray(pseudo_label_figure(*args, **kwargs)).save(path, compress_level=3)
    return path
