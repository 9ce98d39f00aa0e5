"""3D volumes (serial-section EM and other stacks): read, write, and train / segment them slice by slice.

Scribble2Label works on 2D images; a volume is used as a stack of 2D slices taken along one axis (the config key
``slice_axis``). This module holds what that needs and what MONAI lacks:

* **Readers** that give one slice without loading the volume (:func:`open_volume`): TIFF stacks with ``tifffile``
  (memory-mapped when the file is uncompressed, page by page otherwise; MONAI's ``PILReader`` silently reads only
  the first page), NIfTI with ``nibabel`` (its lazy ``dataobj``), MHA / MHD / NRRD with ``itk``, and OME-Zarr
  folders (``.ome.zarr`` / ``.zarr``, level 0 of the multiscale image, :mod:`s2l_monai.ome_zarr`) chunk by chunk.
* **Writers** (:class:`VolumeWriter`) that fill an output slice by slice into a memory-mapped scratch file and then
  encode it in the input's format with the input's geometry: TIFF resolution tags and ImageJ ``spacing`` / ``unit``
  metadata, NIfTI affine and header, ITK spacing / origin / direction. The final file appears by ``os.replace``.
  OME-Zarr outputs are written straight into the Zarr array (no scratch copy of the volume): the slices of one row
  of chunks along the slice axis are gathered in memory and written as whole chunks, in the input's chunking and
  with its ``scale`` / unit, into a temporary folder renamed into place at the end. Several processes can write
  one OME-Zarr output (each its own chunks): under ``torchrun`` the slices of such a volume are split across the
  ranks in chunk-aligned blocks (:func:`s2l_monai.distributed.volume_shares`); TIFF, NIfTI and ITK outputs are one
  file encoded by one process, so those volumes stay whole on one rank.
* :func:`slice_items`: expands the volume items of a datalist into per-slice items (``id`` = the volume's id,
  ``slice`` = the index, ``num_slices``) so the whole 2D pipeline of ``configs/train.json`` is reused unchanged.
* :class:`LoadVolumeSliced`: the MONAI transform that reads those slices (``1HW``), in place of ``LoadImaged``.
* :class:`SaveVolumeSliced`: the inference post-processing that writes the slices of a prediction into output
  volumes (semantic, instances, probability) and finishes each volume when its last slice arrives;
  :class:`SharedVolumesHandler` does the collective steps of the volumes whose slices several ranks write.
* :func:`volume_instances_3d` and :class:`VolumeMetricsHandler`: 3D connected components and 3D instance metrics.

Why not ``RandSpatialCropSamplesd(roi [P, P, 1]) + SqueezeDimd`` on whole volumes (MONAI's recipe for slice-wise
training): it loads every volume as float32 into memory (a 512^3 volume is 512 MB per copy, and CacheDataset keeps
one), samples patches from unscribbled slices, and the EMA pseudo-label volume would have to be loaded whole for
every patch. Per-slice items read 0.25 MB from a memory-mapped file and keep every 2D transform, the 2D scribble
cropping (``RandCropByLabelClassesd``) and the 2D EMA store code path as they are.

Axis convention: every volume is seen as a numpy array in ``ZYX`` order (slowest-varying axis on disk first): the
pages of a TIFF stack, the ``k, j, i`` axes of NIfTI (nibabel's ``i, j, k`` array transposed), the array view of an
ITK image. ``slice_axis`` indexes that array (0 = the usual slices of a z-stack), and spacings are given in the same
order. A slice keeps the remaining two axes in order (axis 0 -> ``YX``, axis 1 -> ``ZX``, axis 2 -> ``ZY``).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import min_version, optional_import
from scipy import ndimage as ndi

from s2l_monai import distributed
from s2l_monai.faults import fault_point
from s2l_monai.inference_io import image_stem
from s2l_monai.ome_zarr import create_ome_zarr, is_zarr_path, open_ome_zarr

Events, _ = optional_import("ignite.engine", "0.5", min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", "0.5", min_version, "Engine")

__all__ = [
    "INSTANCE_MODES",
    "VOLUME_EXTENSIONS",
    "LoadVolumeSliced",
    "SaveVolumeSliced",
    "SharedVolumesHandler",
    "Volume",
    "VolumeGeometry",
    "VolumeMetricsHandler",
    "VolumeWriter",
    "is_volume_path",
    "open_volume",
    "read_volume",
    "shared_write_extent",
    "slice_items",
    "volume_extension",
    "volume_format",
    "volume_instances_3d",
    "write_volume",
]

logger = logging.getLogger(__name__)

#: File endings read as volumes (case-insensitive).
VOLUME_EXTENSIONS: tuple[str, ...] = (
    ".tif", ".tiff", ".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".ome.zarr", ".zarr"
)
#: How instances are made from a semantic volume: per slice (2D, ids made unique over the volume) or 3D components.
INSTANCE_MODES: tuple[str, ...] = ("slice", "3d")
# dtypes an ImageJ hyperstack can hold; other dtypes are written as plain (shaped) TIFF.
_IMAGEJ_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))
_INCH_MM, _CM_MM = 25.4, 10.0
#: OME-Zarr reading: a slice read decodes whole chunks, so the chunk row it belongs to (``chunk extent along the
#: slice axis x the slice plane``) is kept for the next slices when it is at most this many bytes.
ZARR_READ_CACHE_BYTES = 256 * 2**20
#: OME-Zarr writing: slices are gathered per chunk row along the slice axis and written as whole chunks when a row
#: is at most this many bytes (per output); larger rows are written slice by slice (chunks read, updated, rewritten).
ZARR_WRITE_BUFFER_BYTES = 256 * 2**20


def volume_extension(path: str | os.PathLike) -> str:
    """The file ending of a volume, lower case (``.nii.gz`` and ``.ome.zarr`` count as one ending)."""
    name = Path(path).name.lower()
    for double in (".nii.gz", ".ome.zarr"):
        if name.endswith(double):
            return double
    return Path(name).suffix


def volume_format(path: str | os.PathLike) -> str:
    """``"tiff"``, ``"nifti"``, ``"itk"`` or ``"zarr"`` (OME-Zarr) from a file name.

    Raises:
        ValueError: an ending that is not a volume format.
    """
    ext = volume_extension(path)
    if ext in (".tif", ".tiff"):
        return "tiff"
    if ext in (".nii", ".nii.gz"):
        return "nifti"
    if ext in (".mha", ".mhd", ".nrrd"):
        return "itk"
    if is_zarr_path(path):
        return "zarr"
    raise ValueError(f"{path}: not a volume file; expected one of {VOLUME_EXTENSIONS}")


def is_volume_path(path: str | os.PathLike) -> bool:
    """Whether the name ends with one of :data:`VOLUME_EXTENSIONS`."""
    return volume_extension(path) in VOLUME_EXTENSIONS


@dataclass
class VolumeGeometry:
    """Shape and geometry of a volume, in the ``ZYX`` array order of this module, plus what its format stores.

    Attributes:
        shape: ``(Z, Y, X)``.
        spacing: voxel size ``(z, y, x)`` (file units: mm for NIfTI / ITK, the TIFF's unit otherwise).
        format: ``"tiff"``, ``"nifti"``, ``"itk"`` or ``"zarr"``.
        unit: length unit where the file names one (TIFF / ImageJ, OME-Zarr axes), else None.
        affine: NIfTI: the 4x4 voxel-to-world affine (nibabel ``i, j, k`` convention).
        header: NIfTI: the nibabel header (copied into outputs, dtype and scaling reset).
        origin: ITK: origin in ITK ``x, y, z`` order.
        direction: ITK: 3x3 direction cosines (ITK order).
        extra: format-specific: OME-Zarr ``chunks`` (``ZYX``), ``translation``, ``name``.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    format: str = "tiff"
    unit: str | None = None
    affine: np.ndarray | None = None
    header: Any = None
    origin: tuple[float, ...] | None = None
    direction: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------------


def _tiff_geometry(tif: Any, shape: tuple[int, int, int]) -> VolumeGeometry:
    page = tif.pages.first if hasattr(tif.pages, "first") else tif.pages[0]
    ij = tif.imagej_metadata or {}
    shaped = (tif.shaped_metadata or [{}])[0] if getattr(tif, "is_shaped", False) else {}
    unit = ij.get("unit") or shaped.get("unit")
    sy = sx = 1.0
    tags = page.tags
    if "XResolution" in tags and "YResolution" in tags:
        xres, yres = tags["XResolution"].value, tags["YResolution"].value
        xr = xres[0] / xres[1] if xres[1] else 0.0
        yr = yres[0] / yres[1] if yres[1] else 0.0
        sx = 1.0 / xr if xr > 0 else 1.0
        sy = 1.0 / yr if yr > 0 else 1.0
        res_unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2
        if unit is None and res_unit in (2, 3):
            unit = "inch" if res_unit == 2 else "centimeter"
    sz = float(ij.get("spacing", shaped.get("spacing", 1.0)))
    return VolumeGeometry(shape=shape, spacing=(sz, float(sy), float(sx)), format="tiff", unit=unit)


def _as_zyx_shape(shape: Sequence[int], path: Path) -> tuple[int, int, int]:
    dims = [int(s) for s in shape]
    while len(dims) > 3 and dims[0] == 1:
        dims = dims[1:]
    if len(dims) == 2:
        dims = [1, *dims]
    if len(dims) != 3:
        raise ValueError(f"{path}: expected a grey 3D volume (Z, Y, X), got shape {tuple(shape)}")
    return dims[0], dims[1], dims[2]


class Volume:
    """A read-only volume seen as a ``ZYX`` array, read lazily slice by slice.

    Use :func:`open_volume` (it caches one open volume per file and process). ``volume.slice(axis, k)`` returns one
    2D slice as a numpy array in the file's dtype; ``volume.read()`` the whole ``ZYX`` array (memory-mapped where
    the format allows it).

    Args:
        path: the file.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.format = volume_format(self.path)
        self._array: Any = None  # ZYX array-like supporting basic slicing
        self._pages: Any = None  # tifffile pages, for compressed TIFF along axis 0
        self._tif: Any = None
        self._scratch: Path | None = None
        self._block: tuple[int, int, int, np.ndarray] | None = None  # OME-Zarr: (axis, start, stop, chunk row)
        getattr(self, f"_open_{self.format}")()
        self.shape: tuple[int, int, int] = self.geometry.shape
        self.ndim = 3

    # -- format-specific opening -------------------------------------------------------------------------------------
    def _open_tiff(self) -> None:
        import tifffile

        self._tif = tifffile.TiffFile(self.path)
        series = self._tif.series[0]
        shape = _as_zyx_shape(series.shape, self.path)
        self.dtype = np.dtype(series.dtype)
        self.geometry = _tiff_geometry(self._tif, shape)
        try:
            self._array = tifffile.memmap(self.path, mode="r").reshape(shape)
        except (ValueError, OSError):  # compressed or not contiguous: decode pages on demand
            self._pages = self._tif.pages if len(self._tif.pages) >= shape[0] else None

    def _open_nifti(self) -> None:
        import nibabel as nib

        img = nib.load(str(self.path))
        if len(img.shape) < 3:
            raise ValueError(f"{self.path}: expected a 3D NIfTI, got shape {img.shape}")
        if len(img.shape) > 3 and any(s != 1 for s in img.shape[3:]):
            raise ValueError(f"{self.path}: expected a 3D NIfTI, got shape {img.shape}")
        proxy = img.dataobj
        scaled = getattr(proxy, "slope", 1.0) != 1.0 or getattr(proxy, "inter", 0.0) != 0.0
        self.dtype = np.dtype(np.float32) if scaled else np.dtype(img.get_data_dtype())
        if volume_extension(self.path) == ".nii.gz":
            # gzip cannot seek: reading slice k means decompressing up to k, so read it once (file dtype, no float64)
            data = np.asanyarray(proxy)
            data = data.reshape(data.shape[:3])
            self._array = data.T  # i, j, k -> k, j, i (a view)
        else:
            self._array = _NiftiZYX(proxy, img.shape[:3])
        shape = tuple(int(s) for s in img.shape[:3][::-1])
        zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
        self.geometry = VolumeGeometry(
            shape=shape, spacing=zooms[::-1], format="nifti", affine=np.asarray(img.affine), header=img.header.copy()
        )

    def _open_itk(self) -> None:
        import itk

        image = itk.imread(str(self.path))
        array = itk.array_view_from_image(image)
        if array.ndim == 2:
            array = array[None]
        if array.ndim != 3:
            raise ValueError(f"{self.path}: expected a grey 3D image, got array shape {array.shape}")
        self._itk_image = image  # keeps the buffer of the view alive
        self._array = array
        self.dtype = np.dtype(array.dtype)
        spacing = tuple(float(s) for s in image.GetSpacing())
        origin = tuple(float(o) for o in image.GetOrigin())
        direction = np.asarray(itk.array_from_matrix(image.GetDirection()), dtype=np.float64)
        self.geometry = VolumeGeometry(
            shape=tuple(int(s) for s in array.shape), spacing=spacing[::-1], format="itk", origin=origin,
            direction=direction,
        )

    def _open_zarr(self) -> None:
        array, info = open_ome_zarr(self.path)
        self._array = array
        self.dtype = np.dtype(array.dtype)
        extra: dict[str, Any] = {"chunks": info.chunks}
        if info.translation is not None:
            extra["translation"] = info.translation
        if info.name:
            extra["name"] = info.name
        self.geometry = VolumeGeometry(
            shape=info.shape, spacing=info.spacing, format="zarr", unit=info.unit, extra=extra
        )

    # -- access ------------------------------------------------------------------------------------------------------
    def slice(self, axis: int, index: int) -> np.ndarray:
        """One 2D slice ``index`` along ``axis`` (0, 1, 2 of ``ZYX``), in the file's dtype.

        Raises:
            IndexError: ``index`` outside the volume.
        """
        axis = int(axis)
        if axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1 or 2, got {axis}")
        index = int(index)
        if not 0 <= index < self.shape[axis]:
            raise IndexError(f"{self.path.name}: slice {index} outside 0..{self.shape[axis] - 1} along axis {axis}")
        if self._array is None and self._pages is not None and axis == 0:
            return np.asarray(self._pages[index].asarray()).reshape(self.shape[1:])
        if self.format == "zarr":
            return self._zarr_slice(axis, index)
        array = self._full_for_pages() if self._array is None else self._array
        sl: list[Any] = [slice(None)] * 3
        sl[axis] = index
        return np.asarray(array[tuple(sl)])

    def _zarr_slice(self, axis: int, index: int) -> np.ndarray:
        """A slice of an OME-Zarr volume; the chunk row holding it is decoded once and kept for its neighbours."""
        block = self._block
        if block is not None and block[0] == axis and block[1] <= index < block[2]:
            return block[3][(slice(None),) * axis + (index - block[1],)].copy()
        sl: list[Any] = [slice(None)] * 3
        extent = int(self.geometry.extra["chunks"][axis])
        plane = math.prod(s for a, s in enumerate(self.shape) if a != axis)
        if extent > 1 and extent * plane * self.dtype.itemsize <= ZARR_READ_CACHE_BYTES:
            start = index // extent * extent
            stop = min(start + extent, self.shape[axis])
            sl[axis] = slice(start, stop)
            self._block = None  # the previous row is freed before the next is read
            rows = np.asarray(self._array[tuple(sl)])
            self._block = (axis, start, stop, rows)
            return rows[(slice(None),) * axis + (index - start,)].copy()
        sl[axis] = index
        return np.asarray(self._array[tuple(sl)])

    def _full_for_pages(self) -> np.ndarray:
        """Decode a compressed TIFF once into a scratch memory-mapped file (for slices along axis 1 or 2)."""
        import tifffile

        if self._array is None:
            fd, name = tempfile.mkstemp(suffix=".npy", prefix="s2l_volume_")
            os.close(fd)
            self._scratch = Path(name)
            out = np.lib.format.open_memmap(name, mode="w+", dtype=self.dtype, shape=self.shape)
            if self._pages is not None:
                for k in range(self.shape[0]):  # one page at a time: memory stays flat
                    out[k] = np.asarray(self._pages[k].asarray()).reshape(self.shape[1:])
            else:
                out[:] = tifffile.imread(self.path).reshape(self.shape)
            out.flush()
            del out
            self._array = np.load(name, mmap_mode="r")
        return self._array

    def read(self) -> np.ndarray:
        """The whole ``ZYX`` array (a memory map where the file allows it, else decoded)."""
        if self._array is None:
            return self._full_for_pages()
        if isinstance(self._array, _NiftiZYX):
            return np.asanyarray(self._array.proxy).reshape(self._array.shape_ijk).T
        if self.format == "zarr":
            return np.asarray(self._array[...])
        return self._array

    def close(self) -> None:
        """Release the file handle and any scratch file."""
        if self._tif is not None:
            self._tif.close()
        self._array = None
        self._block = None
        if self._scratch is not None:
            self._scratch.unlink(missing_ok=True)
            self._scratch = None

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            if self._scratch is not None:
                self._scratch.unlink(missing_ok=True)
        except Exception:  # noqa: BLE001
            pass


class _NiftiZYX:
    """nibabel ``ArrayProxy`` (``i, j, k``) presented as ``k, j, i``: ``a[k] == proxy[:, :, k].T`` (lazy read)."""

    def __init__(self, proxy: Any, shape_ijk: Sequence[int]) -> None:
        self.proxy = proxy
        self.shape_ijk = tuple(int(s) for s in shape_ijk)
        self.shape = self.shape_ijk[::-1]

    def __getitem__(self, item: tuple[Any, ...]) -> np.ndarray:
        ijk = tuple(item[::-1]) + (0,) * (len(self.proxy.shape) - 3)
        return np.asarray(self.proxy[ijk]).T


_OPEN: dict[tuple[str, int, float, int], Volume] = {}
_MAX_OPEN = 8


def open_volume(path: str | os.PathLike) -> Volume:
    """An open :class:`Volume` for ``path``, cached per process (a DataLoader worker opens its own).

    Re-opened when the file's modification time changes; at most 8 volumes stay open per process.
    """
    p = Path(path).resolve()
    key = (str(p), os.getpid(), p.stat().st_mtime, p.stat().st_size)
    vol = _OPEN.get(key)
    if vol is None:
        for old in [k for k in _OPEN if k[0] == key[0] or k[1] != key[1]]:
            _OPEN.pop(old)
        while len(_OPEN) >= _MAX_OPEN:
            _OPEN.pop(next(iter(_OPEN)))
        vol = _OPEN[key] = Volume(p)
    return vol


def read_volume(path: str | os.PathLike) -> tuple[np.ndarray, VolumeGeometry]:
    """The whole ``ZYX`` array of a volume file (in memory) and its geometry."""
    vol = Volume(path)
    try:
        return np.array(vol.read()), vol.geometry
    finally:
        vol.close()


# ---------------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------------


def _tiff_resolution(geometry: VolumeGeometry) -> tuple[tuple[float, float], int | None]:
    """``((x_res, y_res), ResolutionUnit)`` for ``tifffile.imwrite`` from a spacing in the geometry's unit."""
    _, sy, sx = geometry.spacing
    unit = (geometry.unit or "").lower()
    res_unit = 2 if unit == "inch" else 3 if unit == "centimeter" else 1
    return (1.0 / sx if sx else 1.0, 1.0 / sy if sy else 1.0), res_unit


class VolumeWriter:
    """Write a ``ZYX`` volume slice by slice, then encode it in a volume format with a given geometry.

    Slices go into a memory-mapped scratch ``.npy`` next to the output (memory stays flat); :meth:`close` encodes it
    (TIFF: ImageJ hyperstack with ``spacing`` / ``unit`` and resolution tags for uint8 / uint16 / float32, else a
    zlib-compressed TIFF with the same tags in tifffile's shaped JSON metadata; NIfTI: the reference affine and
    header with this dtype; ITK: spacing, origin, direction) into a temporary file that replaces ``path``
    atomically, and deletes the scratch file.

    OME-Zarr (``path`` ending in ``.ome.zarr`` / ``.zarr``) has no scratch copy: :attr:`array` is the level-0 Zarr
    array of a temporary ``.zarr`` folder next to ``path``, created with the geometry's chunks
    (``geometry.extra["chunks"]``, as :class:`Volume` reads them) and ``scale`` / unit. Slices are gathered per chunk
    row along the slice axis (:data:`ZARR_WRITE_BUFFER_BYTES`) and each complete row is written as whole chunks,
    so memory stays at one chunk row per output; :meth:`close` writes what is left and renames the folder to
    ``path``. Call :meth:`flush` before reading :attr:`array` back.

    Several processes can fill one OME-Zarr output, each writing its own chunks (one file per chunk): one process
    creates the temporary folder (``create=True``), the others open it (``create=False``) after a barrier, all with
    the same ``token`` (which names the folder); each writes the slices of its chunk rows, the others
    :meth:`detach`, and after a second barrier the creator alone calls :meth:`close` (see
    :class:`SharedVolumesHandler`). The other formats are one file encoded by one process: they refuse
    ``create=False``.

    Args:
        path: output file; its ending picks the format (see :func:`volume_format`).
        shape: ``(Z, Y, X)``.
        dtype: numpy dtype of the output.
        geometry: the geometry to write (usually the input's :attr:`Volume.geometry`); ``None``: unit spacing.
        token: names the temporary file or folder (default: this process's id).
        create: create the temporary OME-Zarr folder; False opens the one another process created with ``token``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        shape: Sequence[int],
        dtype: Any,
        geometry: VolumeGeometry | None = None,
        token: int | str | None = None,
        create: bool = True,
    ) -> None:
        self.path = Path(path)
        self.format = volume_format(self.path)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.geometry = geometry or VolumeGeometry(shape=self.shape)  # type: ignore[arg-type]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._rows: dict[tuple[int, int], tuple[np.ndarray, set[int]]] = {}  # OME-Zarr: (axis, start) -> row, done
        token = os.getpid() if token is None else token
        if not create and self.format != "zarr":
            raise ValueError(f"{self.path.name}: only OME-Zarr outputs can be written by several processes")
        if self.format == "zarr":
            import shutil

            self._scratch = self.path.with_name(f".{self.path.name}.{token}.tmp.zarr")
            if create:
                shutil.rmtree(self._scratch, ignore_errors=True)
                g = self.geometry
                self.array = create_ome_zarr(
                    self._scratch, self.shape, self.dtype, chunks=g.extra.get("chunks"), spacing=g.spacing,
                    unit=g.unit, translation=g.extra.get("translation"), name=g.extra.get("name"),
                )
            else:
                import zarr

                self.array = zarr.open_array(str(self._scratch / "0"), mode="r+")
                if tuple(self.array.shape) != self.shape or np.dtype(self.array.dtype) != self.dtype:
                    raise ValueError(f"{self._scratch}: {self.array.shape} {self.array.dtype}, expected "
                                     f"{self.shape} {self.dtype}")
            self.chunks: tuple[int, ...] = tuple(int(c) for c in self.array.chunks)
            return
        self._scratch = self.path.with_name(f".{self.path.name}.{token}.scratch.npy")
        self.array = np.lib.format.open_memmap(self._scratch, mode="w+", dtype=self.dtype, shape=self.shape)

    def write_slice(self, axis: int, index: int, data: np.ndarray) -> None:
        """Put a 2D slice (values must fit the dtype) at ``index`` along ``axis``."""
        axis, index = int(axis), int(index)
        sl: list[Any] = [slice(None)] * 3
        sl[axis] = index
        if self.format != "zarr":
            self.array[tuple(sl)] = data
            return
        extent = self.chunks[axis]
        plane = [s for a, s in enumerate(self.shape) if a != axis]
        if extent == 1 or extent * math.prod(plane) * self.dtype.itemsize > ZARR_WRITE_BUFFER_BYTES:
            self.array[tuple(sl)] = np.asarray(data, dtype=self.dtype)  # chunks read, updated and rewritten
            return
        start = index // extent * extent
        stop = min(start + extent, self.shape[axis])
        key = (axis, start)
        if key not in self._rows:
            if len(self._rows) >= 2:  # slices out of order: write the oldest row's slices as they are
                self._flush_row(next(iter(self._rows)))
            row_shape = list(self.shape)
            row_shape[axis] = stop - start
            self._rows[key] = (np.zeros(row_shape, dtype=self.dtype), set())
        row, done = self._rows[key]
        row[(slice(None),) * axis + (index - start,)] = data
        done.add(index)
        if len(done) == stop - start:
            self._flush_row(key)

    def _flush_row(self, key: tuple[int, int]) -> None:
        """Write a gathered chunk row into the Zarr array (whole chunks when it is complete)."""
        row, done = self._rows.pop(key)
        axis, start = key
        stop = start + row.shape[axis]
        if len(done) == stop - start:
            self.array[(slice(None),) * axis + (slice(start, stop),)] = row
            return
        for k in sorted(done):  # an incomplete row: only its written slices (the others may come later)
            self.array[(slice(None),) * axis + (k,)] = row[(slice(None),) * axis + (k - start,)]

    def flush(self) -> None:
        """Write the slices still gathered in memory (OME-Zarr; memory-mapped outputs are flushed to disk)."""
        if self.format == "zarr":
            for key in list(self._rows):
                self._flush_row(key)
        elif hasattr(self, "array"):
            self.array.flush()

    def close(self) -> Path:
        """Encode the volume into ``path`` (atomically) and remove the scratch file; returns ``path``."""
        if self.format == "zarr":
            return self._close_zarr()
        self.array.flush()
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp{volume_extension(self.path)}")
        try:
            getattr(self, f"_write_{self.format}")(tmp)
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
            del self.array
            self._scratch.unlink(missing_ok=True)
        return self.path

    def _close_zarr(self) -> Path:
        import shutil

        try:
            self.flush()
            del self.array
            old = None
            if self.path.exists():  # a folder cannot replace a non-empty folder: move the old one aside first
                old = self.path.with_name(f".{self.path.name}.{os.getpid()}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(self.path, old)
            os.replace(self._scratch, self.path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            self._rows.clear()
            shutil.rmtree(self._scratch, ignore_errors=True)
        return self.path

    def detach(self) -> None:
        """OME-Zarr written by several processes: write the gathered rows and let go of the temporary folder,
        which stays for the process that created it to :meth:`close`."""
        self.flush()
        if hasattr(self, "array"):
            del self.array
        self._rows.clear()

    def abort(self) -> None:
        """Drop the scratch file (OME-Zarr: the temporary folder) without writing."""
        if hasattr(self, "array"):
            del self.array
        self._rows.clear()
        if self.format == "zarr":
            import shutil

            shutil.rmtree(self._scratch, ignore_errors=True)
            return
        self._scratch.unlink(missing_ok=True)

    def _write_tiff(self, tmp: Path) -> None:
        import tifffile

        g = self.geometry
        resolution, res_unit = _tiff_resolution(g)
        meta: dict[str, Any] = {"spacing": float(g.spacing[0]), "axes": "ZYX"}
        if g.unit:
            meta["unit"] = g.unit
        if self.dtype in _IMAGEJ_DTYPES:
            # ImageJ / Fiji read the z spacing and unit from here; ImageJ hyperstacks are written uncompressed.
            tifffile.imwrite(tmp, self.array, imagej=True, resolution=resolution, metadata=meta)
        else:
            tifffile.imwrite(
                tmp, self.array, resolution=resolution, resolutionunit=res_unit, metadata=meta, compression="zlib"
            )

    def _write_nifti(self, tmp: Path) -> None:
        import nibabel as nib

        g = self.geometry
        header = g.header.copy() if g.header is not None else nib.Nifti1Header()
        affine = g.affine if g.affine is not None else np.diag([*g.spacing[::-1], 1.0])
        header.set_data_dtype(self.dtype)
        header.set_slope_inter(1.0, 0.0)
        data = np.load(self._scratch, mmap_mode="r").T  # k, j, i -> i, j, k (a Fortran-ordered view)
        img = nib.Nifti1Image(data, affine, header=header)
        img.header.set_zooms(tuple(g.spacing[::-1]))
        nib.save(img, str(tmp))

    def _write_itk(self, tmp: Path) -> None:
        import itk

        g = self.geometry
        image = itk.image_view_from_array(np.ascontiguousarray(np.load(self._scratch, mmap_mode="r")))
        image.SetSpacing([float(s) for s in g.spacing[::-1]])
        if g.origin is not None:
            image.SetOrigin([float(o) for o in g.origin])
        if g.direction is not None:
            image.SetDirection(itk.matrix_from_array(np.ascontiguousarray(g.direction, dtype=np.float64)))
        itk.imwrite(image, str(tmp), compression=True)


def write_volume(path: str | os.PathLike, array: np.ndarray, geometry: VolumeGeometry | None = None) -> Path:
    """Write a whole ``ZYX`` array as a volume file with ``geometry`` (see :class:`VolumeWriter`)."""
    arr = np.asarray(array)
    if arr.ndim != 3:
        raise ValueError(f"expected a ZYX array, got shape {arr.shape}")
    if geometry is not None:
        geometry = VolumeGeometry(**{**geometry.__dict__, "shape": tuple(arr.shape)})
    writer = VolumeWriter(path, arr.shape, arr.dtype, geometry)
    writer.array[:] = arr
    return writer.close()


# ---------------------------------------------------------------------------------------------------------------------
# Datalist expansion and the loading transform
# ---------------------------------------------------------------------------------------------------------------------


def shared_write_extent(path: str | os.PathLike, axis: int) -> int | None:
    """How many slices along ``axis`` one chunk row of the outputs of volume ``path`` holds, where several processes
    can write those outputs; None where one process must write them.

    :class:`SaveVolumeSliced` writes the outputs in the input's format. OME-Zarr is one file per chunk, so ranks
    can fill disjoint rows of chunks of one store (the extent is the input's chunk extent along ``axis``, clipped
    to the volume as :func:`s2l_monai.ome_zarr.create_ome_zarr` clips it); TIFF, NIfTI and ITK files are encoded
    whole by one process, so their volumes stay on one rank (None).
    """
    if volume_format(path) != "zarr":
        return None
    vol = open_volume(path)
    chunks = vol.geometry.extra.get("chunks") or (16, 256, 256)
    return max(1, min(int(chunks[int(axis)]), vol.shape[int(axis)]))


def _scribbled_slices(path: str, axis: int, unlabelled: int) -> list[int]:
    vol = open_volume(path)
    return [k for k in range(vol.shape[axis]) if bool(np.any(vol.slice(axis, k) != unlabelled))]


def slice_items(
    items: Sequence[dict[str, Any]],
    slice_axis: int | None,
    unlabelled: int = 255,
    scribbled_only: bool = True,
    image_key: str = "image",
    scribble_key: str = "scribble",
    block_key: str | None = None,
) -> list[dict[str, Any]]:
    """Expand volume items into one item per 2D slice (identity when ``slice_axis`` is None, i.e. 2D).

    Each slice item is the volume item plus ``slice`` (index along ``slice_axis``) and ``num_slices``; its ``id``
    stays the volume's, so the EMA store keeps ONE pseudo-label volume per item (see
    :meth:`s2l_monai.ensemble.EMAStore.update_slice`). With ``scribbled_only`` (training), only the slices that
    carry at least one scribbled pixel are kept: the scribbled-pixel loss has nothing on the others, and the
    prediction ensemble iterates over the same list, so it covers exactly the slices that are trained on (the
    pseudo-labels of the other slices would never be read).

    Args:
        items: datalist items with an ``image`` path (and a ``scribble`` path for training).
        slice_axis: axis of the ``ZYX`` volume to slice along, or None for 2D data.
        unlabelled: the scribble file's value of unlabelled voxels (before any value mapping).
        scribbled_only: keep only slices with scribbles (needs ``scribble_key`` in every item).
        image_key: key of the image path.
        scribble_key: key of the scribble path.
        block_key: inference under ``torchrun``: the slice items of a volume whose outputs several processes can
            write (OME-Zarr, :func:`shared_write_extent`) carry that chunk extent under this key, and a
            :class:`~s2l_monai.distributed.ShardSampler` with ``split_key=block_key`` splits the volume across the
            ranks. None (training, evaluation) adds nothing.

    Returns:
        The slice items, grouped by volume, slices in increasing order.

    Raises:
        ValueError: a scribble volume whose shape differs from its image, or a volume without any scribbled slice.
    """
    if slice_axis is None or (isinstance(slice_axis, str) and slice_axis.strip().lower() in ("", "none", "null")):
        return list(items)
    axis = int(slice_axis)
    out: list[dict[str, Any]] = []
    for item in items:
        image = open_volume(item[image_key])
        n = image.shape[axis]
        if scribbled_only:
            if scribble_key not in item:
                raise ValueError(f"item {item.get('id', item[image_key])} has no {scribble_key!r} to train on")
            scribble = open_volume(item[scribble_key])
            if scribble.shape != image.shape:
                raise ValueError(f"{item[scribble_key]}: shape {scribble.shape} differs from its image {image.shape}")
            indices = _scribbled_slices(item[scribble_key], axis, int(unlabelled))
            if not indices:
                raise ValueError(f"{item[scribble_key]}: no slice along axis {axis} carries a scribble")
        else:
            indices = list(range(n))
        extra: dict[str, Any] = {}
        if block_key:
            extent = shared_write_extent(item[image_key], axis)
            if extent is not None:
                extra[block_key] = extent
        out += [{**item, "slice": k, "num_slices": n, **extra} for k in indices]
    return out


class LoadVolumeSliced(MapTransform):
    """Read slice ``d[slice_key]`` of the volume files under ``keys``: ``1HW`` MetaTensors (in place of LoadImaged).

    The volume is opened once per process and memory-mapped where the format allows (:func:`open_volume`), so a
    slice costs one 2D read. Metadata: ``filename_or_obj`` (the volume), ``slice_index``, ``slice_axis``,
    ``spatial_shape``, ``slice_spacing`` (in-plane spacing) and a 2D identity affine.

    Args:
        keys: keys of volume paths.
        axis: ``slice_axis`` (0, 1 or 2 of ``ZYX``).
        slice_key: key of the slice index in the item.
        dtype: dtype of the output (``LoadImaged`` gives float32 by default).
        allow_missing_keys: do not raise for absent keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        axis: int | None = 0,
        slice_key: str = "slice",
        dtype: Any = np.float32,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.axis = 0 if axis is None else int(axis)
        self.slice_key = slice_key
        self.dtype = dtype

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.slice_key not in d:
            raise KeyError(f"no {self.slice_key!r} in the item: expand volume items with s2l_monai.volumes.slice_items")
        index = int(d[self.slice_key])
        for key in self.key_iterator(d):
            vol = open_volume(d[key])
            arr = vol.slice(self.axis, index).astype(self.dtype, copy=False)
            in_plane = [s for a, s in enumerate(vol.geometry.spacing) if a != self.axis]
            meta = {
                "filename_or_obj": str(d[key]),
                "slice_index": index,
                "slice_axis": self.axis,
                "num_slices": vol.shape[self.axis],
                "spatial_shape": np.asarray(arr.shape),
                "original_channel_dim": "no_channel",
                "slice_spacing": np.asarray(in_plane),
                "affine": torch.eye(3, dtype=torch.float64),  # 2D, identity as PILReader gives (pixel frame)
            }
            d[key] = MetaTensor(torch.from_numpy(np.ascontiguousarray(arr)[None]), meta=meta)
        return d


# ---------------------------------------------------------------------------------------------------------------------
# Instances
# ---------------------------------------------------------------------------------------------------------------------


def volume_instances_3d(
    semantic: np.ndarray, min_size: int = 64, fill_holes: bool = True, connectivity: int = 1
) -> np.ndarray:
    """3D connected components of a semantic volume, with the paper's cleaning (small objects out, holes filled).

    The same steps as :func:`s2l_monai.instances.connected_instances`, written for large volumes: every step is a
    labelling with ``int32`` output (``scipy.ndimage.label``), no float or int64 copy of the volume, and holes are
    filled by labelling the background once (background components that do not touch the border are holes), which
    equals ``scipy.ndimage.binary_fill_holes`` but costs one pass instead of iterated dilations. Default
    ``connectivity`` 1 (6-neighbourhood): serial-section EM is strongly anisotropic, so diagonal contacts across
    sections are not trusted.

    Args:
        semantic: ``DHW`` array, foreground ``> 0``.
        min_size: components with fewer voxels are removed.
        fill_holes: fill enclosed background cavities.
        connectivity: 1, 2 or 3 (scikit-image convention).

    Returns:
        ``DHW`` int32 labels ``1..N`` (background 0).
    """
    fg = np.asarray(semantic) > 0
    structure = ndi.generate_binary_structure(fg.ndim, int(connectivity))
    labels = np.empty(fg.shape, dtype=np.int32)
    n = ndi.label(fg, structure=structure, output=labels)
    if min_size > 1 and n:
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        small = sizes < min_size
        small[0] = False
        if small.any():
            fg &= ~small[labels]
    if fill_holes:
        bg_structure = ndi.generate_binary_structure(fg.ndim, 1)  # what binary_fill_holes uses
        n_bg = ndi.label(~fg, structure=bg_structure, output=labels)
        if n_bg:
            border = np.zeros(n_bg + 1, dtype=bool)
            for axis in range(fg.ndim):
                for end in (0, -1):
                    border[np.unique(np.take(labels, end, axis=axis))] = True
            hole = ~border
            hole[0] = False
            fg |= hole[labels]
    ndi.label(fg, structure=structure, output=labels)
    return labels


# ---------------------------------------------------------------------------------------------------------------------
# Saving predictions slice by slice
# ---------------------------------------------------------------------------------------------------------------------


def _as_numpy(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


class _VolumeOutputs:
    def __init__(
        self, source: str, outputs: dict[str, VolumeWriter], share: distributed.VolumeShare | None = None
    ) -> None:
        self.source = source
        self.writers = outputs
        self.written: set[int] = set()
        self.next_id = 1
        self.share = share


def _ranges(indices: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``; ``"none"`` when empty."""
    runs: list[list[int]] = []
    for k in sorted(indices):
        if runs and k == runs[-1][1] + 1:
            runs[-1][1] = k
        else:
            runs.append([k, k])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "none"


def _offset_labels(writer: VolumeWriter, axis: int, start: int, stop: int, offset: int) -> None:
    """Add ``offset`` to the labels (``> 0``) of slices ``start..stop-1`` of an OME-Zarr output, a chunk row at a time.

    ``start`` is aligned to the chunk rows, so every row is rewritten as whole chunks (slice by slice where a row is
    over :data:`ZARR_WRITE_BUFFER_BYTES`, as :meth:`VolumeWriter.write_slice` does).
    """
    extent = writer.chunks[axis]
    plane = math.prod(s for a, s in enumerate(writer.shape) if a != axis)
    step = extent if extent * plane * writer.dtype.itemsize <= ZARR_WRITE_BUFFER_BYTES else 1
    for first in range(start, stop, step):
        sl = (slice(None),) * axis + (slice(first, min(first + step, stop)),)
        rows = np.asarray(writer.array[sl])
        writer.array[sl] = np.where(rows > 0, rows + offset, 0).astype(writer.dtype)


class SaveVolumeSliced(MapTransform):
    """Inference post-processing: write each slice's prediction into output volumes shaped like the input.

    For the input ``<dir>/<name><ext>`` it writes ``<output_dir>/<name>_semantic<ext>`` (class ids x
    ``semantic_scale``, uint8), ``<name>_instances<ext>`` (uint32 labels) and, with ``save_probabilities``,
    ``<name>_prob<ext>`` (float32 foreground probability), in the input's format and geometry
    (:class:`VolumeWriter`). Slices are written as they come, into memory-mapped scratch files (OME-Zarr: straight
    into the output's chunks, one chunk row gathered at a time); when the last of a volume's ``num_slices`` slices
    has arrived the outputs are encoded and moved into place.

    Instances (``instance_mode``): ``"slice"`` keeps the per-slice instances of ``instances_key`` (from
    :class:`~s2l_monai.instances.Instancesd`) and offsets their ids so that they are unique in the volume;
    ``"3d"`` ignores them and labels 3D connected components of the finished semantic volume
    (:func:`volume_instances_3d`, cleaned with ``min_size``), which needs the whole semantic volume in memory
    (5 bytes per voxel): ``"slice"`` is the flat-memory mode for OME-Zarr volumes larger than memory.

    Under ``torchrun``, with ``shards`` (the data loader's :class:`~s2l_monai.distributed.ShardSampler`), the
    volumes the sampler splits (OME-Zarr outputs, :func:`~s2l_monai.distributed.volume_shares`) are written by all
    ranks together, every output (semantic, instances, probability) alike: rank 0 creates each output's temporary
    folder at the start of the run (:meth:`start_shared`), every rank writes the chunk rows of its block of slices,
    and at the end (:meth:`finish_shared`) the ranks exchange their instance counts, each adds the ids of the
    blocks before its own to its instances (so ids equal the single-process run's), all wait at a barrier, and
    rank 0 labels 3D instances (``"3d"``) and renames the folders into place. Every output is then the one a
    single process writes, byte for byte. A rank that fails or is killed before that barrier leaves the final
    paths untouched (a previous output stays); only a hidden temporary folder remains. :class:`SharedVolumesHandler`
    calls the two steps; volumes the sampler keeps whole (TIFF, NIfTI, ITK: one file that one process encodes) are
    written by their rank alone as above.

    Args:
        keys: ``(semantic_key, instances_key, prob_key)`` of the post-processed item (``1HW`` each).
        output_dir: output folder.
        axis: ``slice_axis``.
        instance_mode: ``"slice"`` or ``"3d"``.
        min_size: small-object threshold of the 3D components.
        save_probabilities: also write the probability volume (``prob_key`` must be present).
        semantic_scale: factor on the class ids (255 for a viewable mask).
        slice_key: key of the slice index in the item.
        ref_key: key of the image whose metadata names the input volume.
        shards: the sampler that shares the slices out (its ``shares`` and ``rank``); None: one process.
    """

    def __init__(
        self,
        keys: KeysCollection = ("pred", "instances", "prob"),
        output_dir: str | os.PathLike = ".",
        axis: int | None = 0,
        instance_mode: str = "slice",
        min_size: int = 64,
        save_probabilities: Any = False,
        semantic_scale: float = 1,
        slice_key: str = "slice",
        ref_key: str = "image",
        shards: Any = None,
    ) -> None:
        super().__init__(keys, allow_missing_keys=True)
        if instance_mode not in INSTANCE_MODES:
            raise ValueError(f"instance_mode must be one of {INSTANCE_MODES}, got {instance_mode!r}")
        from s2l_monai.inference_io import as_bool

        self.semantic_key, self.instances_key, self.prob_key = (list(self.keys) + [None, None])[:3]
        self.output_dir = Path(output_dir)
        self.axis = 0 if axis is None else int(axis)
        self.instance_mode = instance_mode
        self.min_size = int(min_size)
        self.save_probabilities = as_bool(save_probabilities)
        self.semantic_scale = semantic_scale
        self.slice_key = slice_key
        self.ref_key = ref_key
        self.shards = shards
        self.open: dict[str, _VolumeOutputs] = {}
        self.shared: dict[str, _VolumeOutputs] = {}  # this rank's outputs of the volumes split across ranks
        self._token: Any = None  # names the shared temporary folders, set by start_shared
        self.finished: list[dict[str, Path]] = []

    @property
    def shares(self) -> dict[str, distributed.VolumeShare]:
        """The volumes split across the ranks, by input path (empty without ``shards`` or in one process)."""
        return getattr(self.shards, "shares", None) or {}

    @property
    def rank(self) -> int:
        """This process's rank in the sampler's sharing."""
        return int(getattr(self.shards, "rank", 0) or 0)

    def output_paths(self, source: str | os.PathLike) -> dict[str, Path]:
        """Output files of an input volume: ``{"semantic", "instances", "prob"}`` -> path."""
        ext = volume_extension(source)
        stem = image_stem(source)
        return {kind: self.output_dir / f"{stem}_{kind}{ext}" for kind in ("semantic", "instances", "prob")}

    def _writers(self, source: str, token: Any = None, create: bool = True) -> dict[str, VolumeWriter]:
        vol = open_volume(source)
        paths = self.output_paths(source)
        kinds = [("semantic", np.uint8), ("instances", np.uint32)]
        if self.save_probabilities:
            kinds.append(("prob", np.float32))
        return {kind: VolumeWriter(paths[kind], vol.shape, dtype, vol.geometry, token=token, create=create)
                for kind, dtype in kinds}

    def _source(self, d: Mapping[Hashable, Any]) -> tuple[str, int, int]:
        ref = d[self.ref_key]
        meta = ref.meta if isinstance(ref, MetaTensor) else {}
        source = meta.get("filename_or_obj")
        index = d.get(self.slice_key, meta.get("slice_index"))
        n = meta.get("num_slices", d.get("num_slices"))
        if source is None or index is None or n is None:
            raise KeyError("SaveVolumeSliced needs slice items loaded by LoadVolumeSliced (filename, slice, count)")
        return str(source), int(index), int(n)

    def _shared_entry(self, source: str, share: distributed.VolumeShare) -> _VolumeOutputs:
        entry = self.shared.get(source)
        if entry is None:
            if self._token is None:
                raise RuntimeError(
                    f"{Path(source).name} is split across {len(share.blocks)} ranks but its outputs were not created: "
                    "attach s2l_monai.volumes.SharedVolumesHandler(saver) to the engine (configs/inference.json)"
                )
            writers = self._writers(source, token=self._token, create=False)  # rank 0 created them
            entry = self.shared[source] = _VolumeOutputs(source, writers, share)
        return entry

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        source, index, _ = self._source(d)
        share = self.shares.get(source)
        if share is not None:
            entry = self._shared_entry(source, share)
        else:
            entry = self.open.get(source)
            if entry is None:
                entry = self.open[source] = _VolumeOutputs(source, self._writers(source))
        semantic = _as_numpy(d[self.semantic_key]).reshape(-1, *_as_numpy(d[self.semantic_key]).shape[-2:])[0]
        entry.writers["semantic"].write_slice(self.axis, index, np.rint(semantic * self.semantic_scale))
        if self.instance_mode == "slice":
            inst = _as_numpy(d[self.instances_key])
            inst = inst.reshape(-1, *inst.shape[-2:])[0].astype(np.uint32)
            n_inst = int(inst.max()) if inst.size else 0
            if n_inst:
                inst = np.where(inst > 0, inst + (entry.next_id - 1), 0).astype(np.uint32)
                entry.next_id += n_inst
            entry.writers["instances"].write_slice(self.axis, index, inst)
        if "prob" in entry.writers:
            prob = _as_numpy(d[self.prob_key])
            entry.writers["prob"].write_slice(self.axis, index, prob.reshape(-1, *prob.shape[-2:])[0])
        entry.written.add(index)
        fault_point("volume_slice")
        if share is not None:
            if len(entry.written) == share.counts[self.rank]:  # this rank's block is done: nothing kept in memory
                for writer in entry.writers.values():
                    writer.flush()
        elif len(entry.written) == open_volume(source).shape[self.axis]:
            self._finish(source)
        return d

    def _finish(self, source: str) -> None:
        self._close(self.open.pop(source))

    def _close(self, entry: _VolumeOutputs, note: str = "") -> None:
        if self.instance_mode == "3d":
            # needs the whole semantic volume in memory for OME-Zarr too (1 byte + 4 bytes of labels per voxel);
            # instance_mode "slice" is the flat-memory mode for volumes larger than memory.
            entry.writers["semantic"].flush()
            semantic = np.asarray(entry.writers["semantic"].array[...])
            entry.writers["instances"].array[...] = volume_instances_3d(semantic, min_size=self.min_size)
            del semantic
        paths = {kind: writer.close() for kind, writer in entry.writers.items()}
        self.finished.append(paths)
        logger.info(f"Wrote {', '.join(p.name for p in paths.values())} for {Path(entry.source).name}{note}.")

    # -- volumes split across ranks ------------------------------------------------------------------------------------
    def start_shared(self) -> None:
        """Collective, at the start of the run: rank 0 creates the outputs of every split volume; all ranks wait.

        Nothing (and no collective) where no volume is split.
        """
        shares = self.shares
        if not shares:
            return
        if distributed.world_size() != len(next(iter(shares.values())).blocks) or not distributed.is_distributed():
            raise RuntimeError(f"volumes are split for {len(next(iter(shares.values())).blocks)} ranks but the "
                               f"process group has {distributed.world_size()}")
        self._token = distributed.all_gather_objects(os.getpid())[0]  # rank 0's process id names the folders
        if self.rank == 0:
            for source, share in shares.items():
                self.shared[source] = _VolumeOutputs(source, self._writers(source, token=self._token), share)
        distributed.barrier()  # the stores exist before any rank writes a chunk

    def finish_shared(self) -> None:
        """Collective, at the end of the run: number the instances across blocks, then rank 0 publishes.

        Every rank writes what it gathered; the ranks exchange the slices they wrote and their instance counts;
        each adds the counts of the blocks before its own to its instance ids (``instance_mode="slice"``), so ids
        are those of the single-process run; all wait at a barrier; rank 0 labels 3D instances (``"3d"``) and
        renames each output's temporary folder into place (a volume not every slice of which was written is
        dropped with an error in the log); all wait again.
        """
        shares = self.shares
        if not shares:
            return
        mine: dict[str, tuple[list[int], int]] = {}
        for source, entry in self.shared.items():
            for writer in entry.writers.values():
                writer.flush()
            mine[source] = (sorted(entry.written), entry.next_id - 1)
        gathered = distributed.all_gather_objects(mine)
        complete: dict[str, str] = {}
        for source, share in shares.items():
            per_rank = [g.get(source, ([], 0)) for g in gathered]
            if sorted(k for slices, _ in per_rank for k in slices) == list(range(share.num_slices)):
                complete[source] = ", ".join(f"{_ranges(slices)} on rank {r}" for r, (slices, _) in enumerate(per_rank))
            offset = sum(n for _, n in per_rank[: self.rank])
            entry = self.shared.get(source)
            if self.instance_mode == "slice" and offset and entry is not None and entry.written:
                start, stop = share.blocks[self.rank]
                _offset_labels(entry.writers["instances"], self.axis, start, stop, offset)
        if self.rank != 0:
            for entry in self.shared.values():
                for writer in entry.writers.values():
                    writer.detach()
            self.shared.clear()
        distributed.barrier()  # every chunk of every rank is written
        if self.rank == 0:
            for source in shares:
                entry = self.shared.pop(source)
                if source in complete:
                    self._close(entry, note=f" (slices {complete[source]})")
                else:
                    logger.error(f"{Path(source).name}: not every slice was written by the ranks; no output")
                    for writer in entry.writers.values():
                        writer.abort()
        self._token = None
        distributed.barrier()  # the outputs are in place when any rank's run returns


class SharedVolumesHandler:
    """Ignite handler: the collective steps of the volumes whose slices several ranks write.

    At ``STARTED`` it calls :meth:`SaveVolumeSliced.start_shared` (rank 0 creates the OME-Zarr outputs), at
    ``COMPLETED`` :meth:`SaveVolumeSliced.finish_shared` (instance ids numbered across the ranks, outputs renamed
    into place by rank 0). Every rank must attach it; in one process, or when no volume is split, it does nothing.

    Args:
        saver: the post-processing's :class:`SaveVolumeSliced`.
    """

    def __init__(self, saver: SaveVolumeSliced) -> None:
        self.saver = saver

    def attach(self, engine: Engine) -> None:
        """Register on ``STARTED`` and ``COMPLETED``."""
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def started(self, engine: Engine | None = None) -> None:
        self.saver.start_shared()

    def completed(self, engine: Engine | None = None) -> None:
        self.saver.finish_shared()


# ---------------------------------------------------------------------------------------------------------------------
# 3D evaluation
# ---------------------------------------------------------------------------------------------------------------------


class VolumeMetricsHandler:
    """Ignite handler: 3D instance metrics of whole volumes once the evaluator has written its predictions.

    At ``COMPLETED`` it reads, for each labelled volume in ``items``, ``<prediction_dir>/<name>_instances<ext>`` and
    ``<name>_semantic<ext>`` (written by :class:`SaveVolumeSliced`) and the label volume, turns a binary label
    into 3D connected components (:func:`s2l_monai.evaluation.gt_instances`), and scores them with
    :func:`s2l_monai.metrics.evaluate_pair` on the ``DHW`` arrays (its overlap table works for any dimension).
    Reports go to ``<output_dir>/volume_3d/`` (``metrics.csv``, ``summary.json``, ``summary.md``) and the summary
    into ``engine.state.metrics`` with a ``3d_`` prefix. The per-slice metrics are the usual 2D report of
    :class:`~s2l_monai.evaluation.InstanceMetricsHandler`.

    Args:
        items: the evaluated items (slice items are de-duplicated by ``image``); those without ``label`` skipped.
        prediction_dir: where the predictions were written.
        output_dir: report folder (``volume_3d`` is added); None writes nothing.
    """

    def __init__(
        self, items: Sequence[dict[str, Any]], prediction_dir: str | os.PathLike, output_dir: str | os.PathLike | None
    ) -> None:
        seen: dict[str, dict[str, Any]] = {}
        for item in items:
            if item.get("label"):
                seen.setdefault(str(item["image"]), item)
        self.items = list(seen.values())
        self.prediction_dir = Path(prediction_dir)
        self.output_dir = None if output_dir is None else Path(output_dir) / "volume_3d"
        self.records: list[dict[str, Any]] = []
        self.summary: dict[str, Any] = {}

    def attach(self, engine: Engine) -> None:
        """Register on ``COMPLETED``."""
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine | None = None) -> dict[str, Any]:
        from s2l_monai.evaluation import gt_instances
        from s2l_monai.metrics import evaluate_pair, summarise, write_reports

        self.records = []
        for item in self.items:
            source = item["image"]
            stem, ext = image_stem(source), volume_extension(source)
            pred_path = self.prediction_dir / f"{stem}_instances{ext}"
            if not pred_path.exists():
                raise FileNotFoundError(f"{pred_path} was not written (save_predictions must be true for 3D metrics)")
            pred, _ = read_volume(pred_path)
            sem_path = self.prediction_dir / f"{stem}_semantic{ext}"
            semantic = read_volume(sem_path)[0] > 0 if sem_path.exists() else None
            label, _ = read_volume(item["label"])
            gt = gt_instances(label)
            self.records.append(evaluate_pair(pred.astype(np.int64), gt, semantic, name=stem))
        self.summary = summarise(self.records)
        if engine is not None:
            engine.state.metrics.update({f"3d_{k}": v for k, v in self.summary.items()
                                         if isinstance(v, (int, float)) and not math.isnan(float(v))})
        if self.output_dir is not None and self.records:
            write_reports(self.records, self.output_dir)
        return self.summary
