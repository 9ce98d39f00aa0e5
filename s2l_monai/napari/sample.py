"""Sample data for ``File > Open Sample``: a synthetic nuclei image with a few scribbles."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

__all__ = ["NUCLEUS", "BACKGROUND", "SAMPLE_NAME", "sample_scribbles", "synthetic_sample"]

#: label values of the sample's scribbles (the widget's defaults)
NUCLEUS, BACKGROUND = 1, 2
SAMPLE_NAME = "synthetic nuclei"


def sample_scribbles(labels: np.ndarray, ratio: float = 0.3, seed: int = 0) -> np.ndarray:
    """Brush-like strokes for an instance label map: the paper's automatic scribbles, 3 px wide.

    The skeleton pieces of :func:`s2l_monai.data.scribbles.auto_scribbles` are one pixel wide; here they are
    widened by one pixel inside their own class (never across a nucleus boundary), as a brush would paint them.

    Args:
        labels: ``HW`` instance labels (0 = background).
        ratio: share of the skeleton pieces kept.
        seed: seed of the choice of pieces.

    Returns:
        ``HW`` uint8: :data:`NUCLEUS` on nucleus strokes, :data:`BACKGROUND` on background strokes, 0 elsewhere.
    """
    from s2l_monai.data.scribbles import auto_scribbles

    thin = auto_scribbles(labels, ratio, np.random.default_rng(seed), background=0, foreground=1, unlabelled=255)
    nuclei = labels > 0
    out = np.zeros(labels.shape, dtype=np.uint8)
    out[ndimage.binary_dilation(thin == 0) & ndimage.binary_erosion(~nuclei)] = BACKGROUND
    out[ndimage.binary_dilation(thin == 1) & ndimage.binary_erosion(nuclei)] = NUCLEUS
    out[thin == 0] = BACKGROUND
    out[thin == 1] = NUCLEUS
    return out


def synthetic_sample(shape: tuple[int, int] = (256, 256), seed: int = 7) -> list[tuple[Any, dict[str, Any], str]]:
    """The sample's layers: the image and its scribble layer (napari ``LayerData`` tuples).

    Args:
        shape: image size.
        seed: seed of the image (:func:`s2l_monai.data.synthetic.synthetic_nuclei`) and of its scribbles.
    """
    from s2l_monai.data.synthetic import synthetic_nuclei

    image, labels = synthetic_nuclei(shape, seed=np.random.default_rng([seed, 0, 0]))
    scribbles = sample_scribbles(labels, seed=seed)
    return [
        (image, {"name": SAMPLE_NAME, "colormap": "gray"}, "image"),
        (scribbles, {"name": f"{SAMPLE_NAME} scribbles", "opacity": 0.9}, "labels"),
    ]
