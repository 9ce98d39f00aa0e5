"""Checks at the door: every image, scribble and label a run will read, before it starts.

One checker serves ``s2l prepare folder``, training (``configs/train.json``), inference (``configs/inference.json``),
the MONAI Label app and the napari widget. It reads each file once, collects every problem, each naming its file
(unreadable, wrong shape, too small, NaN or infinite pixels, undeclared scribble values, ...), and raises them
together as one :class:`s2l_monai.errors.DataError`. Items whose scribble has no labelled pixel are not errors:
training leaves them out with a warning that lists them (inference still segments them).

Volumes (3D items trained slice by slice) are read slice by slice through :func:`s2l_monai.volumes.open_volume`,
so checking them keeps memory flat.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from s2l_monai.errors import ConfigError, DataError

__all__ = [
    "MIN_SIDE",
    "NONFINITE_MODES",
    "TrainingCheck",
    "check_image",
    "check_inference_items",
    "check_scribble",
    "check_training_items",
    "is_volume_axis",
    "read_array",
    "scribbled_training_items",
]

#: Smallest accepted image side, in pixels.
MIN_SIDE = 8
#: What to do with NaN / infinite pixels: refuse the file, or replace them
#: (:class:`s2l_monai.transforms.ReplaceNonFinited`).
NONFINITE_MODES = ("error", "replace")

logger = logging.getLogger(__name__)


def read_array(path: str | Path) -> np.ndarray:
    """Read a PNG, TIFF or JPEG file into a numpy array (TIFF with tifffile, the others with Pillow).

    Args:
        path: The file.

    Raises:
        ValueError: If the file cannot be decoded (the message names it).
    """
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            return np.asarray(tifffile.imread(path))
        with Image.open(path) as im:
            return np.asarray(im)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from exc


def _spatial_shape(image: np.ndarray) -> tuple[int, int] | None:
    """HW of an HW or HWC (C <= 4) image, or None if the image is neither."""
    if image.ndim == 2 or (image.ndim == 3 and 1 <= image.shape[-1] <= 4):
        return int(image.shape[0]), int(image.shape[1])
    return None


def _as_2d(array: np.ndarray) -> np.ndarray | None:
    """HW array, also from HW1; None if the array is not single-channel 2D."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return array if array.ndim == 2 else None


def _count_nonfinite(array: np.ndarray) -> int:
    if not np.issubdtype(array.dtype, np.floating) and not np.issubdtype(array.dtype, np.complexfloating):
        return 0  # integer images cannot hold NaN or inf
    return int(array.size - np.count_nonzero(np.isfinite(array)))


def _missing(path: Path, what: str = "file", check_empty: bool = True) -> str | None:
    """Why ``path`` cannot be read as an input (absent or empty), or None. An OME-Zarr volume is a folder."""
    if path.name.lower().endswith(".zarr"):
        if not path.is_dir():
            return f"{path}: OME-Zarr folder does not exist"
        return None
    if not path.is_file():
        return f"{path}: {what} does not exist"
    if check_empty and path.stat().st_size == 0:
        return f"{path}: {what} is empty (0 bytes)"
    return None


def _slices(path: Path) -> tuple[tuple[int, ...], Callable[[int], np.ndarray], np.dtype]:
    """Shape ``ZYX`` of a volume, a reader of its ``Z`` slices (memory-mapped / chunk by chunk) and its dtype."""
    from s2l_monai.volumes import open_volume

    try:
        vol = open_volume(path)
        return tuple(int(s) for s in vol.shape), lambda k: np.asarray(vol.slice(0, k)), np.dtype(vol.dtype)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"{path}: cannot be read as a volume ({type(exc).__name__}: {exc})") from exc


def check_image(
    path: str | Path, volume: bool = False, nonfinite: str = "error"
) -> tuple[tuple[int, ...] | None, list[str], list[str]]:
    """Read an image (or volume) and check it.

    Args:
        path: the file.
        volume: a ``ZYX`` volume (checked slice by slice) instead of an ``HW``/``HWC`` image.
        nonfinite: ``"error"`` makes NaN/inf pixels a problem, ``"replace"`` a warning.

    Returns:
        ``(shape, problems, warnings)``: the spatial shape (``HW`` or ``ZYX``; None if unreadable), then one line
        per problem and per warning, each naming the file.
    """
    path = Path(path)
    problems: list[str] = []
    warnings: list[str] = []
    missing = _missing(path)
    if missing:
        return None, [missing], []
    bad = 0
    try:
        if volume:
            shape, read, dtype = _slices(path)
            if len(shape) != 3:
                return None, [f"{path}: volume shape {shape} is not ZYX"], []
            if np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.complexfloating):
                for k in range(shape[0]):  # integer volumes cannot hold NaN: not read at all
                    bad += _count_nonfinite(read(k))
            spatial: tuple[int, ...] = shape
            sides = shape[1:]
        else:
            array = read_array(path)
            hw = _spatial_shape(array)
            if hw is None:
                return None, [f"{path}: image shape {array.shape} is neither HW nor HWC (at most 4 channels)"], []
            bad = _count_nonfinite(array)
            spatial = sides = hw
    except ValueError as exc:
        return None, [str(exc)], []
    if min(sides) < MIN_SIDE:
        problems.append(f"{path}: image is {'x'.join(map(str, sides))} pixels; at least {MIN_SIDE}x{MIN_SIDE} needed")
    if bad:
        text = f"{path}: {bad} pixel(s) are NaN or infinite"
        if nonfinite == "replace":
            warnings.append(text + " (replaced: nonfinite_pixels is 'replace')")
        else:
            problems.append(text + "; fix the file or run with --nonfinite_pixels replace")
    return spatial, problems, warnings


def check_scribble(
    path: str | Path, shape: tuple[int, ...] | None, values: Mapping[str, int], volume: bool = False
) -> tuple[list[str], dict[str, int]]:
    """Check a scribble map against its image's shape and the declared values.

    Args:
        path: the scribble file.
        shape: its image's spatial shape (None: unknown, not compared).
        values: ``{"background", "foreground", "unlabelled"}`` scribble values.
        volume: a ``ZYX`` volume.

    Returns:
        ``(problems, counts)``: one line per problem naming the file, and the numbers of ``background`` and
        ``foreground`` pixels.
    """
    path = Path(path)
    counts = {"background": 0, "foreground": 0}
    missing = _missing(path, "scribble file")
    if missing:
        return [missing], counts
    declared = {int(values[k]) for k in ("background", "foreground", "unlabelled")}
    found: set[Any] = set()
    try:
        if volume:
            own, read, _ = _slices(path)
            planes = (read(k) for k in range(own[0]))
        else:
            plane = _as_2d(read_array(path))
            if plane is None:
                return [f"{path}: scribble must be a single-channel HW image (one value per pixel)"], counts
            own, planes = plane.shape, iter([plane])
        if shape is not None and tuple(own) != tuple(shape):
            return [f"{path}: scribble shape {tuple(own)} differs from its image's {tuple(shape)}"], counts
        for plane in planes:
            found.update(np.unique(plane).tolist())
            counts["background"] += int(np.count_nonzero(plane == values["background"]))
            counts["foreground"] += int(np.count_nonzero(plane == values["foreground"]))
    except ValueError as exc:
        return [str(exc)], counts
    undeclared = sorted(v for v in found if not (isinstance(v, (int, float)) and np.isfinite(v) and v in declared))
    if undeclared:
        hint = " (JPEG is lossy: save scribbles as PNG or TIFF)" if path.suffix.lower() in (".jpg", ".jpeg") else ""
        shown = ", ".join(str(v) for v in undeclared[:10]) + (", ..." if len(undeclared) > 10 else "")
        return [f"{path}: scribble holds undeclared values [{shown}]; declared are {dict(values)}{hint}"], counts
    return [], counts


def check_label(path: str | Path, shape: tuple[int, ...] | None, volume: bool = False) -> list[str]:
    """Check a full mask / instance map: readable, single-channel, the image's shape."""
    path = Path(path)
    missing = _missing(path, "label file", check_empty=False)
    if missing:
        return [missing]
    try:
        if volume:
            own, _, _ = _slices(path)
        else:
            label = _as_2d(read_array(path))
            if label is None:
                return [f"{path}: label must be a single-channel HW mask or instance map"]
            own = label.shape
    except ValueError as exc:
        return [str(exc)]
    if shape is not None and tuple(own) != tuple(shape):
        return [f"{path}: label shape {tuple(own)} differs from its image's {tuple(shape)}"]
    return []


@dataclass
class TrainingCheck:
    """What :func:`check_training_items` found.

    Attributes:
        items: the items to train on (unscribbled ones left out).
        unscribbled: image paths of the items whose scribble has no labelled pixel.
        problems: one line per problem (empty when the data are usable).
        warnings: one line per warning (replaced NaN pixels, ...).
        counts: background and foreground scribble pixels over the kept items.
    """

    items: list[dict[str, Any]] = field(default_factory=list)
    unscribbled: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: {"background": 0, "foreground": 0})


def check_training_items(
    items: Sequence[Mapping[str, Any]],
    values: Mapping[str, int],
    volume: bool = False,
    nonfinite: str = "error",
    require_both_classes: bool = True,
) -> TrainingCheck:
    """Check every item of a training list (image, scribble and optional label files).

    Args:
        items: datalist items with absolute ``image`` and ``scribble`` paths (``label`` optional).
        values: the scribble values ``{"background", "foreground", "unlabelled"}``.
        volume: items are ``ZYX`` volumes.
        nonfinite: ``"error"`` or ``"replace"`` (see :data:`NONFINITE_MODES`).
        require_both_classes: it is a problem when no kept scribble holds a foreground or no background stroke.

    Returns:
        the :class:`TrainingCheck`; nothing is raised here.
    """
    if nonfinite not in NONFINITE_MODES:
        raise ConfigError(f"nonfinite_pixels must be one of {NONFINITE_MODES}, got {nonfinite!r}")
    report = TrainingCheck()
    if not items:
        report.problems.append("the training list is empty")
        return report
    for item in items:
        shape, problems, warnings = check_image(item["image"], volume=volume, nonfinite=nonfinite)
        report.warnings += warnings
        if "scribble" not in item:
            problems.append(f"{item['image']}: the item has no scribble file")
            counts = {"background": 0, "foreground": 0}
        else:
            scribble_problems, counts = check_scribble(item["scribble"], shape, values, volume=volume)
            problems += scribble_problems
        if item.get("label"):
            problems += check_label(item["label"], shape, volume=volume)
        report.problems += problems
        if problems:
            continue
        if counts["background"] + counts["foreground"] == 0:
            report.unscribbled.append(str(item["image"]))
            continue
        report.items.append(dict(item))
        for k in counts:
            report.counts[k] += counts[k]
    if not report.problems and require_both_classes:
        if not report.items:
            report.problems.append(f"none of the {len(items)} training scribbles has a labelled pixel")
        else:
            for cls in ("foreground", "background"):
                if report.counts[cls] == 0:
                    report.problems.append(
                        f"no training scribble has a {cls} stroke (value {values[cls]}); scribble both nuclei "
                        f"(foreground {values['foreground']}) and background ({values['background']})"
                    )
    return report


def is_volume_axis(slice_axis: Any) -> bool:
    """Whether a config's ``slice_axis`` asks for volumes (not None / ``"none"`` / ``""``)."""
    return slice_axis is not None and str(slice_axis).strip().lower() not in ("", "none", "null")


def scribbled_training_items(
    items: Sequence[Mapping[str, Any]],
    values: Mapping[str, int],
    slice_axis: Any = None,
    nonfinite: str = "error",
    what: str = "the training data",
) -> list[dict[str, Any]]:
    """The items to train on, after :func:`check_training_items`; the configs' entry point.

    Args:
        items: datalist items (:func:`s2l_monai.data.datalist.load_datalist`).
        values: the scribble values ``{"background", "foreground", "unlabelled"}``.
        slice_axis: the config's ``slice_axis``: None for 2D images, an axis for volumes.
        nonfinite: ``"error"`` or ``"replace"``.
        what: how the message names the data.

    Raises:
        DataError: every problem found, each naming its file.
    """
    report = check_training_items(items, values, volume=is_volume_axis(slice_axis), nonfinite=nonfinite)
    if report.problems:
        raise DataError(report.problems, what)
    for line in report.warnings:
        logger.warning(line)
    if report.unscribbled:
        shown = ", ".join(Path(p).name for p in report.unscribbled[:20])
        more = f" and {len(report.unscribbled) - 20} more" if len(report.unscribbled) > 20 else ""
        logger.warning(
            f"{len(report.unscribbled)} of {len(items)} training image(s) have no scribbled pixel and are left out "
            f"of training (they are still segmented by inference): {shown}{more}"
        )
    return report.items


def check_inference_items(
    items: Sequence[Mapping[str, Any]], volume: bool = False, nonfinite: str = "error"
) -> tuple[list[dict[str, Any]], list[str]]:
    """Split inference items into the readable ones and the failures (one line each, naming the file).

    Args:
        items: items with an absolute ``image`` path.
        volume: items are ``ZYX`` volumes.
        nonfinite: ``"error"`` or ``"replace"``.

    Returns:
        ``(good items, failures)``.
    """
    if nonfinite not in NONFINITE_MODES:
        raise ConfigError(f"nonfinite_pixels must be one of {NONFINITE_MODES}, got {nonfinite!r}")
    good: list[dict[str, Any]] = []
    failures: list[str] = []
    for item in items:
        _, problems, warnings = check_image(item["image"], volume=volume, nonfinite=nonfinite)
        for line in warnings:
            logger.warning(line)
        if problems:
            failures += problems
        else:
            good.append(dict(item))
    return good, failures


def readable_items(
    checked: tuple[list[dict[str, Any]], list[str]], what: str = "the input images"
) -> list[dict[str, Any]]:
    """The good items of :func:`check_inference_items`; logs the failures, raises when nothing is left.

    Raises:
        DataError: no item can be read.
    """
    good, failures = checked
    if not good:
        raise DataError(failures or ["no input image"], what)
    if failures:
        logger.warning(
            f"{len(failures)} input file(s) cannot be segmented and are skipped (listed again at the end):\n  - "
            + "\n  - ".join(failures)
        )
    return good


def report_failures(checked: tuple[list[dict[str, Any]], list[str]], output_dir: str | Path) -> None:
    """After a run over :func:`readable_items`: raise the failures, if any, so the run exits non-zero.

    Raises:
        DataError: the files that could not be segmented (the others were written to ``output_dir``).
    """
    good, failures = checked
    if failures:
        raise DataError(
            failures, f"the input: {len(good)} image(s) were segmented into {output_dir}, these {len(failures)} not"
        )
