"""Inputs and outputs of inference: listing a folder of images, writing 2D label / probability images.

Everything here keeps numpy ``(row, col)`` orientation: the configs read images with
``PILReader(reverse_indexing=False)``, and :class:`SaveArrayd` writes the arrays back without transposing, so an
output file overlays its input pixel for pixel.
"""

from __future__ import annotations

import os
import re
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import ensure_tuple_rep
from PIL import Image

__all__ = ["IMAGE_EXTENSIONS", "SaveArrayd", "as_bool", "image_stem", "list_images", "source_name", "write_array"]

#: File types read as input images (case-insensitive).
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
_OUTPUT_EXTENSIONS = (".png", ".tif", ".tiff")
# endings of image formats stored as a folder (one item in a listing)
_FOLDER_FORMATS = (".zarr",)
_STEM = re.compile(r"(\.ome\.tiff?|\.ome\.zarr|\.nii\.gz|\.[A-Za-z0-9]+)$", re.IGNORECASE)


def as_bool(value: Any) -> bool:
    """A config flag as a bool, whether it came from JSON (``true``) or the command line.

    ``python -m monai.bundle run ... --save_probabilities false`` hands the config the *string* ``"false"`` (fire
    only turns ``False`` into a bool), which plain ``not @flag`` would treat as true.

    Args:
        value: bool, number, or one of ``true/false, yes/no, on/off, 1/0`` in any case.

    Raises:
        ValueError: an unrecognised string.
    """
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("true", "yes", "on", "1"):
            return True
        if text in ("false", "no", "off", "0", ""):
            return False
        raise ValueError(f"expected a boolean flag, got {value!r}")
    return bool(value)


def image_stem(path: str | os.PathLike) -> str:
    """Base name of an image file without folder and extension (``a/b/x.ome.tif`` -> ``x``, ``x.nii.gz`` -> ``x``).

    An OME-Zarr volume is a folder: ``a/x.ome.zarr`` (or ``a/x.ome.zarr/``) -> ``x``, ``x.zarr`` -> ``x``.
    """
    return _STEM.sub("", Path(path).name)


def list_images(input_dir: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[dict[str, str]]:
    """Items ``{"image": path, "id": stem}`` for the images directly inside a folder, sorted by file name.

    A folder whose name ends with an accepted ending that names a folder format (``.zarr`` / ``.ome.zarr``: an
    OME-Zarr volume) is one item; other folders are skipped.

    Args:
        input_dir: folder of images (not searched recursively; hidden files are skipped).
        extensions: file name endings accepted (case-insensitive).

    Returns:
        One item per image, with an absolute path.

    Raises:
        DataError: the folder does not exist, holds no image, or two images share a base name (their outputs would
            overwrite each other).
    """
    from s2l_monai.errors import DataError

    root = Path(input_dir)
    if not root.is_dir():
        raise DataError([f"{root}: folder does not exist"], "input_dir")
    exts = tuple(e.lower() for e in extensions)
    files = sorted(
        p
        for p in root.iterdir()
        if not p.name.startswith(".")
        and p.name.lower().endswith(exts)
        and (p.is_file() or (p.is_dir() and p.name.lower().endswith(_FOLDER_FORMATS)))
    )
    if not files:
        raise DataError([f"{root}: no images ({', '.join(exts)}) found"], "input_dir")
    seen: dict[str, str] = {}
    items = []
    for path in files:
        stem = image_stem(path)
        if stem in seen:
            raise DataError([f"{root}: {seen[stem]} and {path.name} share the base name {stem!r}"], "input_dir")
        seen[stem] = path.name
        items.append({"image": str(path.resolve()), "id": stem})
    return items


def source_name(data: Mapping[Hashable, Any], ref_key: str = "image") -> str:
    """Base name of the file an item was loaded from (``filename_or_obj`` in the metadata of ``ref_key``).

    Args:
        data: a (decollated) item holding ``ref_key`` as a ``MetaTensor`` or with a ``<ref_key>_meta_dict``.
        ref_key: key of the loaded image.

    Raises:
        KeyError: no file name can be found.
    """
    ref = data.get(ref_key)
    meta = ref.meta if isinstance(ref, MetaTensor) else data.get(f"{ref_key}_meta_dict", {})
    name = meta.get("filename_or_obj") if isinstance(meta, Mapping) else None
    if isinstance(name, (list, tuple)):  # a batch of size 1 that was not decollated
        name = name[0] if len(name) == 1 else None
    if not name:
        raise KeyError(f"no 'filename_or_obj' in the metadata of {ref_key!r}")
    return image_stem(str(name))


def write_array(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write a ``HW`` array as PNG (uint8 / uint16) or TIFF (any dtype), in numpy orientation.

    Args:
        path: output file; ``.png``, ``.tif`` or ``.tiff``.
        array: ``HW`` array; PNG needs uint8 or uint16 (16-bit grey PNG).

    Returns:
        The path written.

    Raises:
        ValueError: not 2D, an unsupported extension, or a dtype PNG cannot hold.
    """
    path = Path(path)
    arr = np.ascontiguousarray(array)
    if arr.ndim != 2:
        raise ValueError(f"expected a HW array for {path.name}, got shape {arr.shape}")
    ext = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if ext == ".png":
        if arr.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"PNG holds uint8 or uint16, got {arr.dtype} for {path.name}")
        Image.fromarray(arr).save(path, format="PNG")
    elif ext in (".tif", ".tiff"):
        import tifffile

        tifffile.imwrite(path, arr, compression="zlib")
    else:
        raise ValueError(f"unsupported output extension {ext!r}; expected one of {_OUTPUT_EXTENSIONS}")
    return path


class SaveArrayd(MapTransform):
    """Write channel-first ``1HW`` predictions to ``<output_dir>/<name><postfix><ext>``, untransposed.

    ``<name>`` is the base name of the file the item was loaded from (``ref_key``'s ``filename_or_obj``), so
    outputs sit beside each other under the input's name: ``x.png`` -> ``x_semantic.png``, ``x_instances.png``.

    Hand-written rather than MONAI's ``SaveImaged`` because its ``PILWriter`` swaps the first two axes when writing
    (``reverse_indexing=True`` is the writer's default and ``SaveImaged`` has no argument to change it), so a
    ``96x80`` mask read with ``PILReader(reverse_indexing=False)`` is written as an ``80x96`` file (checked with
    monai 1.6.1, for ``.png`` and ``.tif`` alike, both served by ``PILWriter``).

    Args:
        keys: keys of ``1HW`` (or ``HW``) arrays / tensors to write; the item is returned unchanged.
        output_dir: output folder (created).
        output_postfix: appended to the base name, one per key or one for all (e.g. ``"_semantic"``).
        output_ext: ``".png"`` or ``".tif"`` (``".tiff"``), one per key or one for all.
        output_dtype: numpy dtype written, one per key or one for all; values are checked to fit integer dtypes.
        scale: factor applied before the cast, one per key or one for all (e.g. 255 for a viewable 0/255 mask).
        ref_key: key whose metadata names the source file.
        allow_missing_keys: do not raise for absent keys.

    Raises:
        ValueError: an unsupported extension, or values that do not fit ``output_dtype``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str | os.PathLike,
        output_postfix: str | Sequence[str] = "",
        output_ext: str | Sequence[str] = ".png",
        output_dtype: Any = np.uint8,
        scale: float | Sequence[float] = 1,
        ref_key: str = "image",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        n = len(self.keys)
        self.output_dir = Path(output_dir)
        self.postfixes = ensure_tuple_rep(output_postfix, n)
        self.exts = tuple(e if e.startswith(".") else f".{e}" for e in ensure_tuple_rep(output_ext, n))
        for ext in self.exts:
            if ext.lower() not in _OUTPUT_EXTENSIONS:
                raise ValueError(f"unsupported output extension {ext!r}; expected one of {_OUTPUT_EXTENSIONS}")
        dtypes = output_dtype if isinstance(output_dtype, (list, tuple)) else (output_dtype,) * n
        self.dtypes = tuple(np.dtype(d) for d in dtypes)
        self.scales = ensure_tuple_rep(scale, n)
        self.ref_key = ref_key

    def filename(self, data: Mapping[Hashable, Any], postfix: str, ext: str) -> Path:
        """Output path of one key of an item: ``<output_dir>/<name><postfix><ext>``."""
        # Not MONAI's FolderLayout: it strips anything after the last dot of the name as an extension, so an input
        # "img.v2.png" would be written as "img.png".
        return self.output_dir / f"{source_name(data, self.ref_key)}{postfix}{ext}"

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        per_key = (self.postfixes, self.exts, self.dtypes, self.scales)
        for key, postfix, ext, dtype, scale in self.key_iterator(d, *per_key):
            value = d[key]
            arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            if arr.ndim == 3 and arr.shape[0] == 1:
                arr = arr[0]
            arr = arr * scale if scale != 1 else arr
            if np.issubdtype(dtype, np.integer):
                info = np.iinfo(dtype)
                if arr.size and (arr.min() < info.min or arr.max() > info.max):
                    raise ValueError(f"{key!r} spans {arr.min()}..{arr.max()}, beyond {dtype} ({info.min}..{info.max})")
                arr = np.rint(arr) if np.issubdtype(arr.dtype, np.floating) else arr
            write_array(self.filename(d, postfix, ext), arr.astype(dtype, copy=False))
        return d
