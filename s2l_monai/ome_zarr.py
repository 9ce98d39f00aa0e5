"""OME-Zarr (OME-NGFF) volumes: open level 0 of a multiscale image, create a one-level image, chunk by chunk.

Large EM volumes are kept as OME-Zarr: a folder (``name.ome.zarr``) holding a Zarr group whose ``multiscales``
attribute lists the resolution levels (``datasets``, each an array with a ``scale`` coordinate transformation) and
the ``axes`` (name, type, unit). Only the chunks a slice touches are read, so a volume larger than memory is
segmented slice by slice with flat memory (see :mod:`s2l_monai.volumes`).

* :func:`open_ome_zarr` opens level 0 (the full resolution) of an OME-NGFF 0.4 image (Zarr v2, ``multiscales`` in
  the group's attributes) or 0.5 (Zarr v3, under ``attributes["ome"]``), or a plain 3D Zarr array; leading
  non-spatial axes (``t``, ``c``) must have size 1 and are dropped. It returns the array seen as ``ZYX`` and its
  :class:`ZarrInfo` (voxel size from the level's ``scale``, unit, chunks, translation).
* :func:`create_ome_zarr` writes an OME-NGFF 0.4 image with one level ``"0"`` (Zarr v2 format, ``/`` chunk key
  separator as the spec asks) with given chunks and scale, and returns its array to be filled.

Written with the ``zarr`` package (2.18 or 3.x); nothing else (no ``ome-zarr-py``, which would pull dask).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["NGFF_VERSION", "ZARR_EXTENSIONS", "ZarrInfo", "create_ome_zarr", "is_zarr_path", "open_ome_zarr"]

#: Folder endings read as OME-Zarr volumes (case-insensitive); ``.ome.zarr`` is the spec's recommendation.
ZARR_EXTENSIONS: tuple[str, ...] = (".ome.zarr", ".zarr")
#: The OME-NGFF version written.
NGFF_VERSION = "0.4"
_SPATIAL = ("z", "y", "x")


def is_zarr_path(path: str | os.PathLike) -> bool:
    """Whether the name ends with ``.zarr`` (an OME-Zarr volume is a folder)."""
    return Path(path).name.lower().endswith(".zarr")


def _zarr_major() -> int:
    import zarr

    return int(str(zarr.__version__).split(".")[0])


@dataclass
class ZarrInfo:
    """What an OME-Zarr image says about its level 0, in ``ZYX`` order.

    Attributes:
        shape: ``(Z, Y, X)`` of level 0.
        chunks: chunk shape ``(cz, cy, cx)`` of level 0.
        spacing: voxel size from the level's (and the image's) ``scale`` transformations.
        unit: the spatial axes' unit (e.g. ``"micrometer"``), None when not given.
        translation: the level's ``translation`` (``ZYX``), None when not given.
        name: the image's ``name`` in the metadata, if any.
        axes: the axis names of the stored array (e.g. ``["c", "z", "y", "x"]``).
        path: the dataset path of level 0 inside the group (``""`` for a plain array).
    """

    shape: tuple[int, int, int]
    chunks: tuple[int, int, int]
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    unit: str | None = None
    translation: tuple[float, float, float] | None = None
    name: str | None = None
    axes: list[str] = field(default_factory=lambda: list(_SPATIAL))
    path: str = "0"


def _transforms(transforms: Sequence[dict[str, Any]] | None, n: int) -> tuple[list[float], list[float] | None]:
    scale, translation = [1.0] * n, None
    for t in transforms or ():
        if t.get("type") == "scale" and "scale" in t:
            scale = [a * float(b) for a, b in zip(scale, t["scale"])]
        elif t.get("type") == "translation" and "translation" in t:
            translation = [float(v) for v in t["translation"]]
    return scale, translation


class _ZYXView:
    """A stored array with leading singleton axes (``t``, ``c``) seen as ``ZYX``; basic slicing reads chunks."""

    def __init__(self, array: Any, lead: int) -> None:
        self.array = array
        self.lead = lead
        self.shape = tuple(int(s) for s in array.shape[lead:])
        self.dtype = np.dtype(array.dtype)
        self.chunks = tuple(int(c) for c in array.chunks[lead:])
        self.ndim = 3

    def __getitem__(self, item: Any) -> np.ndarray:
        item = item if isinstance(item, tuple) else (item,)
        return np.asarray(self.array[(0,) * self.lead + item])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[...]
        return out if dtype is None else out.astype(dtype, copy=False)


def open_ome_zarr(path: str | os.PathLike) -> tuple[_ZYXView, ZarrInfo]:
    """Open level 0 of an OME-Zarr image (or a plain 3D Zarr array) read-only, as a lazily read ``ZYX`` array.

    Args:
        path: the ``.ome.zarr`` / ``.zarr`` folder.

    Returns:
        ``(array, info)``: ``array[k]``, ``array[:, j]``, ``array[:, :, i]`` read only the chunks they touch.

    Raises:
        ValueError: not a Zarr group / array, no ``multiscales``, or not a single-channel 3D image.
    """
    import zarr

    path = Path(path)
    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:  # noqa: BLE001 - re-raised with the folder named
        raise ValueError(f"{path}: not a Zarr group or array ({type(exc).__name__}: {exc})") from exc
    if isinstance(node, zarr.Array):  # a plain array: no metadata, unit spacing
        array, dataset_path, translation, name, unit_found = node, "", None, None, None
        axes = ["?"] * max(0, node.ndim - 3) + list(_SPATIAL)[-node.ndim:]
        scale = [1.0] * node.ndim
    else:
        attrs = dict(node.attrs)
        ms = attrs.get("multiscales") or (attrs.get("ome") or {}).get("multiscales")
        if not ms:
            raise ValueError(f"{path}: a Zarr group without OME-NGFF 'multiscales' metadata")
        image = ms[0]
        datasets = image.get("datasets") or []
        if not datasets:
            raise ValueError(f"{path}: 'multiscales' lists no datasets")
        dataset_path = str(datasets[0]["path"])
        array = node[dataset_path]
        axes_meta = image.get("axes") or [{"name": a, "type": "space"} for a in "tczyx"[-array.ndim:]]
        axes = [a["name"] if isinstance(a, dict) else str(a) for a in axes_meta]
        if len(axes) != array.ndim:
            raise ValueError(f"{path}: {len(axes)} axes in the metadata for a {array.ndim}D array")
        scale, translation = _transforms(datasets[0].get("coordinateTransformations"), array.ndim)
        global_scale, global_translation = _transforms(image.get("coordinateTransformations"), array.ndim)
        scale = [a * b for a, b in zip(scale, global_scale)]
        if global_translation is not None:
            translation = [a + b for a, b in zip(translation or [0.0] * array.ndim, global_translation)]
        name = image.get("name")
        spatial_units = [a.get("unit") for a in axes_meta if isinstance(a, dict) and a.get("type") == "space"]
        unit_found = next((u for u in spatial_units if u), None)
    if array.ndim < 3:
        raise ValueError(f"{path}: expected a 3D (Z, Y, X) image, got a {array.ndim}D array {array.shape}")
    lead = array.ndim - 3
    if any(int(s) != 1 for s in array.shape[:lead]):
        raise ValueError(
            f"{path}: expected one channel and one time point (a grey ZYX volume), got shape {tuple(array.shape)} "
            f"with axes {axes}"
        )
    view = _ZYXView(array, lead)
    info = ZarrInfo(
        shape=view.shape,  # type: ignore[arg-type]
        chunks=view.chunks,  # type: ignore[arg-type]
        spacing=tuple(float(s) for s in scale[lead:]),  # type: ignore[arg-type]
        unit=unit_found,
        translation=None if translation is None else tuple(float(t) for t in translation[lead:]),  # type: ignore[arg-type]
        name=name,
        axes=axes,
        path=dataset_path,
    )
    return view, info


def create_ome_zarr(
    path: str | os.PathLike,
    shape: Sequence[int],
    dtype: Any,
    chunks: Sequence[int] | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    unit: str | None = None,
    translation: Sequence[float] | None = None,
    name: str | None = None,
) -> Any:
    """Create an OME-NGFF 0.4 image with one level ``"0"`` (``ZYX``, filled with 0) and return its Zarr array.

    Args:
        path: the new ``.ome.zarr`` folder (overwritten if it exists).
        shape: ``(Z, Y, X)``.
        dtype: numpy dtype.
        chunks: chunk shape (default ``(min(Z, 16), min(Y, 256), min(X, 256))``), clipped to the shape.
        spacing: voxel size ``(z, y, x)`` written as the level's ``scale``.
        unit: unit of the spatial axes (an OME-NGFF / UDUNITS-2 name such as ``"micrometer"``); None: no unit.
        translation: optional ``(z, y, x)`` translation of level 0.
        name: optional image name.

    Returns:
        The writable level-0 ``zarr.Array``.
    """
    import zarr

    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ValueError(f"expected a ZYX shape, got {shape}")
    default = (16, 256, 256)
    chunks = tuple(max(1, min(int(c), s)) for c, s in zip(chunks or default, shape))
    axes = [{"name": a, "type": "space", **({"unit": unit} if unit else {})} for a in _SPATIAL]
    transforms: list[dict[str, Any]] = [{"type": "scale", "scale": [float(s) for s in spacing]}]
    if translation is not None:
        transforms.append({"type": "translation", "translation": [float(t) for t in translation]})
    multiscale: dict[str, Any] = {
        "version": NGFF_VERSION,
        "axes": axes,
        "datasets": [{"path": "0", "coordinateTransformations": transforms}],
    }
    if name:
        multiscale["name"] = name
    if _zarr_major() >= 3:
        root = zarr.open_group(str(path), mode="w", zarr_format=2)
        array = root.create_array(
            "0", shape=shape, chunks=chunks, dtype=np.dtype(dtype), fill_value=0,
            chunk_key_encoding={"name": "v2", "separator": "/"},
        )
    else:  # zarr 2.18
        root = zarr.open_group(str(path), mode="w")
        array = root.create_dataset(
            "0", shape=shape, chunks=chunks, dtype=np.dtype(dtype), fill_value=0, dimension_separator="/"
        )
    root.attrs["multiscales"] = [multiscale]
    return array
