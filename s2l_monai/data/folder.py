"""Turn a user's own folders of images and scribbles (and optional full labels) into a checked datalist.

See :func:`prepare_folder`. Every problem in the data is collected first and reported in one ``ValueError`` that
names each offending file and says what is wrong with it.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from s2l_monai.data.checks import check_image, check_label, check_scribble, read_array
from s2l_monai.errors import DataError

__all__ = [
    "DEFAULT_VALUES",
    "IMAGE_EXTENSIONS",
    "LABEL_SUFFIXES",
    "SCRIBBLE_SUFFIXES",
    "prepare_folder",
    "read_array",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
#: Accepted name endings of a scribble file, after the image's base name (``a.png`` <- ``a_scribble.png``).
SCRIBBLE_SUFFIXES: tuple[str, ...] = ("", "_scribble", "_scribbles", "-scribble", "-scribbles")
#: Accepted name endings of a label file, after the image's base name (``a.png`` <- ``a_label.tif``).
LABEL_SUFFIXES: tuple[str, ...] = ("", "_label", "_labels", "-label", "-labels", "_mask", "_masks", "-mask", "-masks")
DEFAULT_VALUES: dict[str, int] = {"background": 0, "foreground": 1, "unlabelled": 255}
DATALIST_NAME = "datalist.json"
_VALUE_KEYS = ("background", "foreground", "unlabelled")
_SPLITS = ("training", "validation", "test")
logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------
# Pairing files by name
# --------------------------------------------------------------------------------------------------------------


def _list_files(folder: Path, excluded_suffixes: Sequence[str] = ()) -> dict[str, list[Path]]:
    """Map stem -> files with a supported extension in ``folder`` (not recursive, hidden files ignored)."""
    out: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith(".") or path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if any(s and path.stem.endswith(s) for s in excluded_suffixes):
            continue
        out.setdefault(path.stem, []).append(path)
    return out


def _match(
    images: Mapping[str, list[Path]], folder: Path, suffixes: Sequence[str], kind: str, problems: list[str]
) -> dict[str, Path]:
    """Find, for each image base name, the one file in ``folder`` named ``<base><suffix>.<ext>``.

    Missing, ambiguous and orphan files (matching no image) are appended to ``problems``. When ``folder`` is the
    image folder itself, the image files are not candidates and only non-empty suffixes count.
    """
    same = folder == next(iter(images.values()))[0].parent
    suffixes = [s for s in suffixes if s or not same]
    files = {k: v for k, v in _list_files(folder).items() if not (same and k in images)}
    matched: dict[str, Path] = {}
    claimed: set[Path] = set()
    for stem in sorted(images):
        candidates = [p for suffix in suffixes for p in files.get(stem + suffix, [])]
        claimed.update(candidates)
        if len(candidates) == 1:
            matched[stem] = candidates[0]
        elif candidates:
            names = ", ".join(p.name for p in candidates)
            problems.append(f"{images[stem][0]}: several {kind} files match it: {names} (in {folder})")
        else:
            looked = ", ".join(f"{stem}{s}.*" for s in suffixes)
            problems.append(f"{images[stem][0]}: no {kind} file (looked for {looked} in {folder})")
    for path in sorted(p for group in files.values() for p in group if p not in claimed):
        problems.append(f"{path}: {kind} file matches no image (expected an image named like '{path.stem}.png')")
    return matched


# --------------------------------------------------------------------------------------------------------------
# Content checks
# --------------------------------------------------------------------------------------------------------------


def _check_item(
    image: Path, scribble: Path | None, label: Path | None, values: Mapping[str, int]
) -> tuple[list[str], bool]:
    """All problems of one image and its scribble/label files (:mod:`s2l_monai.data.checks`), and whether its
    scribble holds a labelled pixel."""
    shape, problems, _ = check_image(image)
    scribbled = True
    if scribble is not None:
        scribble_problems, counts = check_scribble(scribble, shape, values)
        problems += scribble_problems
        scribbled = counts["background"] + counts["foreground"] > 0
    if label is not None:
        problems += check_label(label, shape)
    return problems, scribbled


# --------------------------------------------------------------------------------------------------------------
# Split and datalist
# --------------------------------------------------------------------------------------------------------------


def _split(stems: Sequence[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[str]]:
    """Seeded split: sorted names, ``default_rng(seed).permutation``, then validation, test, training chunks."""
    n = len(stems)
    n_val = int(math.floor(val_fraction * n + 0.5))
    n_test = int(math.floor(test_fraction * n + 0.5))
    if val_fraction > 0 and n_val == 0 and n >= 2:
        n_val = 1
    if test_fraction > 0 and n_test == 0 and n - n_val >= 2:
        n_test = 1
    if n - n_val - n_test < 1:
        raise ValueError(
            f"{n} image(s) leave no training image with val_fraction={val_fraction} and test_fraction={test_fraction}"
        )
    ordered = sorted(stems)
    perm = [ordered[i] for i in np.random.default_rng(seed).permutation(n)]
    return {
        "validation": sorted(perm[:n_val]),
        "test": sorted(perm[n_val : n_val + n_test]),
        "training": sorted(perm[n_val + n_test :]),
    }


def _relative_or_absolute(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` (POSIX separators, ``../`` where it lies outside), absolute only where no
    relative path exists (another drive on Windows)."""
    path = path.resolve()
    try:
        return Path(os.path.relpath(path, root)).as_posix()
    except ValueError:
        return str(path)


def _validate_params(values: Mapping[str, int], val_fraction: float, test_fraction: float, seed: int) -> None:
    missing = [k for k in _VALUE_KEYS if k not in values]
    if missing:
        raise ValueError(f"values must define {list(_VALUE_KEYS)}; missing {missing}")
    if len({int(values[k]) for k in _VALUE_KEYS}) != 3:
        raise ValueError(f"background, foreground and unlabelled values must differ, got {dict(values)}")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"need 0 <= val_fraction, test_fraction and their sum < 1; got {val_fraction}, {test_fraction}"
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def _existing_dir(path: str | os.PathLike, what: str) -> Path:
    folder = Path(path).resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder {folder} does not exist")
    return folder


def prepare_folder(
    images_dir: str | os.PathLike,
    scribbles_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    labels_dir: str | os.PathLike | None = None,
    values: Mapping[str, int] | None = None,
    val_fraction: float = 0.0,
    test_fraction: float = 0.0,
    seed: int = 0,
) -> Path:
    """Check a folder of images and scribbles and write ``datalist.json`` with a seeded split.

    Pairing is by base name: image ``a.png`` (any of .png .tif .tiff .jpg .jpeg) takes the scribble named ``a``,
    ``a_scribble``, ``a_scribbles``, ``a-scribble`` or ``a-scribbles`` (any supported extension), and likewise a
    label named ``a``, ``a_label(s)``, ``a_mask(s)`` (or with ``-``). The images and scribbles may share one folder
    as long as the scribbles carry a suffix.

    Checks (all problems are collected, then raised together): every image has exactly one scribble (and one
    label if ``labels_dir`` is given), no scribble/label matches no image, every file can be read, images are HW
    or HWC with finite pixels, scribbles and labels are single-channel with the image's HW shape, scribbles hold
    only the declared ``values`` (:mod:`s2l_monai.data.checks`). Images whose scribble has no labelled pixel are
    listed in a warning and kept in the datalist: training leaves them out, inference segments them.

    The split is seeded: sorted base names, ``np.random.default_rng(seed).permutation``, the first
    ``round(val_fraction * n)`` become validation, the next ``round(test_fraction * n)`` test, the rest training
    (a non-zero fraction gets at least one image when possible). Validation and test items keep their scribbles:
    validation scribbles allow model selection without full masks.

    Args:
        images_dir: Folder of images.
        scribbles_dir: Folder of scribble maps.
        out_dir: Where ``datalist.json`` goes; default the deepest folder holding all the data folders.
            Paths are written relative to it (with ``../`` for data outside it), so the folder can be moved with
            its data.
        labels_dir: Optional folder of full masks or instance maps (for evaluation only).
        values: Scribble values ``{"background", "foreground", "unlabelled"}``; default 0 / 1 / 255.
        val_fraction: Share of images for validation (default 0: training reads only the ``training`` list, so
            every scribble trains; a validation split is for your own model selection with ``s2l evaluate``).
        test_fraction: Share of images for test.
        seed: Seed of the split.

    Returns:
        Path of the written ``datalist.json``.

    Raises:
        FileNotFoundError: If a data folder does not exist.
        ValueError: On bad parameters.
        DataError: On an empty image folder, or any data problem (all of them, one per line, naming the files).
    """
    values = dict(DEFAULT_VALUES if values is None else values)
    _validate_params(values, val_fraction, test_fraction, seed)
    values = {k: int(values[k]) for k in _VALUE_KEYS}
    images_root = _existing_dir(images_dir, "images")
    scribbles_root = _existing_dir(scribbles_dir, "scribbles")
    labels_root = _existing_dir(labels_dir, "labels") if labels_dir is not None else None

    items, problems, unscribbled = _collect(images_root, scribbles_root, labels_root, values)
    if problems:
        raise DataError(
            problems,
            f"images {images_root}, scribbles {scribbles_root}" + (f", labels {labels_root}" if labels_root else ""),
        )
    if len(unscribbled) == len(items):
        raise DataError([f"{scribbles_root}: no scribble has a labelled pixel"], "the scribbles")
    if unscribbled:
        logger.warning(
            f"{len(unscribbled)} of {len(items)} image(s) have no scribbled pixel; they stay in the datalist, are "
            f"left out of training and still segmented by inference: {', '.join(unscribbled[:20])}"
            + (" ..." if len(unscribbled) > 20 else "")
        )

    roots = [images_root, scribbles_root] + ([labels_root] if labels_root else [])
    out_root = Path(out_dir).resolve() if out_dir is not None else Path(os.path.commonpath(roots))
    split = _split(list(items), val_fraction, test_fraction, seed)
    datalist: dict[str, Any] = {
        "name": out_root.name,
        "description": (
            f"Prepared by s2l_monai.data.folder.prepare_folder from {images_root} and {scribbles_root}; seeded split "
            f"(seed {seed}, val_fraction {val_fraction}, test_fraction {test_fraction})."
        ),
        "scribble_values": values,
    }
    for name in _SPLITS:
        datalist[name] = [
            {key: _relative_or_absolute(path, out_root) for key, path in items[stem].items()} for stem in split[name]
        ]
    out_root.mkdir(parents=True, exist_ok=True)
    path = out_root / DATALIST_NAME
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(datalist, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def _collect(
    images_root: Path, scribbles_root: Path, labels_root: Path | None, values: Mapping[str, int]
) -> tuple[dict[str, dict[str, Path]], list[str], list[str]]:
    """Pair and check all files; return base name -> {"image", "scribble"[, "label"]}, the problems found and the
    names of the images whose scribble has no labelled pixel."""
    problems: list[str] = []
    excluded = [s for s in SCRIBBLE_SUFFIXES if s] if scribbles_root == images_root else []
    excluded += [s for s in LABEL_SUFFIXES if s] if labels_root == images_root else []
    images = _list_files(images_root, excluded_suffixes=excluded)
    if not images:
        raise DataError([f"{images_root}: no images ({', '.join(IMAGE_EXTENSIONS)}) found"], "the images")
    for stem, paths in images.items():
        if len(paths) > 1:
            names = ", ".join(p.name for p in paths)
            problems.append(f"{images_root}: several images share the base name '{stem}': {names}")
    scribbles = _match(images, scribbles_root, SCRIBBLE_SUFFIXES, "scribble", problems)
    labels = _match(images, labels_root, LABEL_SUFFIXES, "label", problems) if labels_root is not None else {}

    items: dict[str, dict[str, Path]] = {}
    unscribbled: list[str] = []
    for stem in tqdm(sorted(images), desc="check", unit="img", disable=len(images) < 50):
        image = images[stem][0]
        found, scribbled = _check_item(image, scribbles.get(stem), labels.get(stem), values)
        problems += found
        if not found and not scribbled:
            unscribbled.append(image.name)
        items[stem] = {"image": image, "scribble": scribbles.get(stem)}  # type: ignore[dict-item]
        if labels_root is not None:
            items[stem]["label"] = labels.get(stem)  # type: ignore[assignment]
    return items, problems, unscribbled
