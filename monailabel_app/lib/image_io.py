"""Read datastore images and labels as 2D images or 3D volumes; write results in the image's own format.

Arrays keep numpy order, as the bundle does (``HW`` / ``HWC`` for 2D images read with PIL, ``ZYX`` for volumes read
with :mod:`s2l_monai.volumes`), so a result overlays its image pixel for pixel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["LoadedImage", "is_volume", "read_image", "read_label", "result_suffix", "write_result"]

_VOLUME_ONLY = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd")


def _suffix(path: str | os.PathLike) -> str:
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def is_volume(path: str | os.PathLike) -> bool:
    """Whether a file holds a 3D volume: NIfTI / MHA / NRRD, or a TIFF with more than one page."""
    suffix = _suffix(path)
    if suffix in _VOLUME_ONLY:
        return True
    if suffix in (".tif", ".tiff"):
        import tifffile

        with tifffile.TiffFile(path) as tif:
            return len(tif.pages) > 1
    return False


@dataclass
class LoadedImage:
    """An image or volume as read from the datastore.

    Attributes:
        array: ``HW`` / ``HWC`` (2D) or ``ZYX`` (3D).
        volume: whether it is a 3D volume.
        geometry: the volume's :class:`s2l_monai.volumes.VolumeGeometry` (None for 2D).
    """

    array: np.ndarray
    volume: bool
    geometry: Any = None

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """``(H, W)`` or ``(Z, Y, X)``."""
        return tuple(self.array.shape[:3] if self.volume else self.array.shape[:2])


def read_image(path: str | os.PathLike) -> LoadedImage:
    """Read a 2D image (PNG, JPEG, single-page TIFF) or a volume (NIfTI, MHA, NRRD, TIFF stack).

    Raises:
        ValueError: the file cannot be read as an image.
    """
    try:
        if is_volume(path):
            from s2l_monai.volumes import read_volume

            array, geometry = read_volume(path)
            return LoadedImage(np.asarray(array), True, geometry)
        with Image.open(path) as img:
            return LoadedImage(np.asarray(img), False)
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"cannot read {Path(path).name} as an image or volume: {e}") from e


def read_label(path: str | os.PathLike) -> LoadedImage:
    """Read a label image: single channel (a grey-level copy in RGB/RGBA channels is reduced to one).

    Raises:
        ValueError: unreadable, or several channels with different content.
    """
    loaded = read_image(path)
    arr = loaded.array
    if not loaded.volume and arr.ndim == 3:
        colour = arr[..., :3] if arr.shape[-1] in (3, 4) else arr
        if not all(np.array_equal(colour[..., 0], colour[..., c]) for c in range(1, colour.shape[-1])):
            raise ValueError(
                f"label {Path(path).name} has {arr.shape[-1]} different channels; a label is one integer value "
                "per pixel (0 = not drawn, then one value per segment)"
            )
        loaded = LoadedImage(colour[..., 0], False)
    if not np.issubdtype(loaded.array.dtype, np.integer) and loaded.array.dtype != bool:
        raw = loaded.array
        if not np.array_equal(raw, np.round(raw)):
            raise ValueError(f"label {Path(path).name} holds non-integer values (dtype {raw.dtype})")
        loaded = LoadedImage(raw.astype(np.int64), loaded.volume, loaded.geometry)
    return loaded


def result_suffix(image_path: str | os.PathLike, volume: bool) -> str:
    """File ending of a result: PNG for 2D images; the volume's own format for volumes (TIFF for TIFF stacks)."""
    if not volume:
        return ".png"
    suffix = _suffix(image_path)
    return ".tif" if suffix == ".tiff" else suffix


def write_result(path: str | os.PathLike, array: np.ndarray, geometry: Any = None) -> Path:
    """Write a result label: ``HW`` as PNG (uint8), ``ZYX`` as a volume with the input's geometry."""
    arr = np.asarray(array)
    if arr.ndim == 2:
        from s2l_monai.inference_io import write_array

        return write_array(path, arr.astype(np.uint8))
    from s2l_monai.volumes import write_volume

    return write_volume(path, arr.astype(np.uint8), geometry)
