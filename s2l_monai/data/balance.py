"""Class balance of scribbles, and the class weights that correct it.

Scribbles are not a random sample of the pixels: strokes drawn along the middle of nuclei and through the
background put a far larger share of their pixels on the foreground than the image holds (automatic DSB2018
scribbles: 36% foreground against 14% of the pixels). A loss that averages over the scribbled pixels then learns
that too-high foreground prior, and the network over-segments (measured in ``benchmarks/results/dsb_analysis.md``).

Importance weighting corrects such a prior shift: weighting each scribbled pixel of class ``c`` by
``w_c = p_image(c) / p_scribble(c)`` makes the weighted scribble sample carry the image's class frequencies. For
two classes, scaled so the foreground weight is 1, the background weight is the odds ratio
``(s / (1 - s)) / (f / (1 - f))`` with ``s`` the foreground share of the scribbled pixels and ``f`` that of the
image. ``f`` comes from full masks where a datalist has them, or from the user's estimate ("nuclei cover about 15%
of the image"). The result goes into ``class_weights`` (and ``pseudo_class_weights``) of ``configs/train.json``.

No MONAI or scikit-image function counts scribble classes over a datalist, hence this small module.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from s2l_monai.data.datalist import DATALIST_NAME
from s2l_monai.data.folder import DEFAULT_VALUES, read_array

__all__ = ["ClassBalance", "scribble_class_balance", "suggested_class_weights"]



@dataclass(frozen=True)
class ClassBalance:
    """Pixel counts of one datalist section.

    Attributes:
        items: number of items counted.
        pixels: all pixels of their scribble maps.
        scribbled_foreground: scribble pixels marked foreground.
        scribbled_background: scribble pixels marked background.
        label_foreground: foreground pixels of the full masks (``label > 0``); None when not every item has one.
    """

    items: int
    pixels: int
    scribbled_foreground: int
    scribbled_background: int
    label_foreground: int | None

    @property
    def scribble_foreground_share(self) -> float:
        """Foreground share ``s`` of the scribbled pixels."""
        return self.scribbled_foreground / max(self.scribbled_foreground + self.scribbled_background, 1)

    @property
    def scribbled_share(self) -> float:
        """Share of all pixels that carry a scribble."""
        return (self.scribbled_foreground + self.scribbled_background) / max(self.pixels, 1)

    @property
    def label_foreground_share(self) -> float | None:
        """Foreground share ``f`` of the full masks, or None without them."""
        return None if self.label_foreground is None else self.label_foreground / max(self.pixels, 1)


def suggested_class_weights(scribble_foreground_share: float, image_foreground_share: float) -> list[float]:
    """Importance weights ``[w_background, w_foreground]`` (foreground 1) that give the scribbled pixels the image's
    class frequencies: ``w_background = (s / (1 - s)) / (f / (1 - f))``.

    Args:
        scribble_foreground_share: ``s``, foreground share of the scribbled pixels, in (0, 1).
        image_foreground_share: ``f``, foreground share of the images (full masks or an estimate), in (0, 1).

    Raises:
        ValueError: a share outside (0, 1) (e.g. scribbles of one class only).
    """
    for name, value in (("scribble foreground share", scribble_foreground_share),
                        ("image foreground share", image_foreground_share)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {value}: both classes need scribbles and pixels.")
    s, f = scribble_foreground_share, image_foreground_share
    return [round((s / (1 - s)) / (f / (1 - f)), 2), 1.0]


def _read_any(path: str) -> np.ndarray:
    """Pixels of a 2D image or a volume; singleton axes dropped (a TIFF may hold one page or a stack)."""
    from s2l_monai.volumes import is_volume_path, read_volume, volume_format

    if is_volume_path(path) and volume_format(path) != "tiff":
        return np.squeeze(read_volume(path)[0])
    return np.squeeze(read_array(path))  # PNG/JPEG with Pillow, TIFF pages or stacks with tifffile


def scribble_class_balance(
    dataset_dir: str | os.PathLike, filename: str = DATALIST_NAME, split: str = "training"
) -> ClassBalance:
    """Count scribbled pixels per class (and full-mask foreground, where given) over one datalist section.

    Scribble values come from the datalist's ``scribble_values`` (default background 0, foreground 1); 2D images
    (PNG, TIFF, JPEG) and volumes (TIFF stacks, NIfTI, MHA/NRRD) are read as :mod:`s2l_monai.data.folder` and
    :mod:`s2l_monai.volumes` read them.

    Args:
        dataset_dir: folder holding the datalist (or the datalist file itself).
        filename: datalist file name, when ``dataset_dir`` is a folder.
        split: section to count.

    Raises:
        FileNotFoundError: no datalist, or a listed file is missing.
        ValueError: the section is empty, or a label's shape differs from its scribble's.
    """
    from s2l_monai.data.datalist import load_datalist

    path = Path(dataset_dir)
    datalist_path = path if path.is_file() else path / filename
    if not datalist_path.is_file():
        raise FileNotFoundError(f"no datalist at {datalist_path}")
    values: dict[str, Any] = {**DEFAULT_VALUES, **json.loads(datalist_path.read_text()).get("scribble_values", {})}
    items = load_datalist(datalist_path, split, synthesize_if_missing=False)
    if not items:
        raise ValueError(f"{datalist_path}: section {split!r} has no items.")
    pixels = fg = bg = 0
    label_fg: int | None = 0
    for item in items:
        scribble = _read_any(item["scribble"])
        pixels += scribble.size
        fg += int((scribble == values["foreground"]).sum())
        bg += int((scribble == values["background"]).sum())
        if label_fg is not None and item.get("label"):
            label = _read_any(item["label"])
            if label.shape != scribble.shape:
                raise ValueError(f"{item['label']}: shape {label.shape} differs from its scribble's {scribble.shape}.")
            label_fg += int((label > 0).sum())
        else:
            label_fg = None
    return ClassBalance(len(items), pixels, fg, bg, label_fg)
