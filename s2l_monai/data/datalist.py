"""Datalists: the MONAI-style JSON that lists images, scribbles and (optional) full masks."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
from pathlib import Path
from typing import Any

from s2l_monai.errors import DataError

__all__ = ["DATALIST_NAME", "load_datalist", "ensure_datalist", "item_id", "legacy_aliases", "legacy_item_id"]

DATALIST_NAME = "datalist.json"
PATH_KEYS = ("image", "scribble", "label")
_EXTENSIONS = re.compile(r"(\.nii\.gz|\.ome\.tiff?|\.[A-Za-z0-9]+)$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")

logger = logging.getLogger(__name__)


def item_id(image_path: str) -> str:
    """Stable id of an item: a readable stem and a short hash of its image path as the datalist writes it.

    ``images/a.png`` -> ``a-<8 hex digits>``. The hash (SHA-1 of the normalised POSIX path) keeps ids apart that
    share a file name in different folders; the stem is the file name without extension, reduced to letters,
    digits, ``_`` and ``-``, so an id never starts with ``.`` whatever the path (``../x.png`` -> ``x-...``) and is a
    safe file name for the EMA store.
    """
    path = posixpath.normpath(image_path.replace("\\", "/"))
    stem = _UNSAFE.sub("_", _EXTENSIONS.sub("", posixpath.basename(path))).strip("_-") or "item"
    return f"{stem[:48]}-{hashlib.sha1(path.encode('utf-8')).hexdigest()[:8]}"


def legacy_item_id(image_path: str) -> str:
    """The id rule of s2l-monai <= 0.4: the path without extension, ``/`` replaced by ``__`` (for migrations)."""
    return _EXTENSIONS.sub("", image_path.replace("\\", "/")).strip("/").replace("/", "__")


def legacy_aliases(
    dataset_dir: str | os.PathLike, key: str = "training", filename: str = DATALIST_NAME
) -> dict[str, str]:
    """``{old id: new id}`` of a datalist section's items whose id changed with the id rule of 0.5.

    Used to migrate an EMA store (and checkpoints) written by s2l-monai <= 0.4 (:class:`s2l_monai.ensemble.EMAStore`
    ``aliases``). Items with an ``id`` of their own keep it and need no alias; a missing datalist gives ``{}``.
    """
    given = Path(dataset_dir)
    path = given if given.is_file() else given / filename
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    aliases = {}
    for raw in content.get(key, []) if isinstance(content, dict) else []:
        if isinstance(raw, dict) and "image" in raw and "id" not in raw:
            aliases[legacy_item_id(str(raw["image"]))] = item_id(str(raw["image"]))
    return aliases


def ensure_datalist(dataset_dir: str | os.PathLike, filename: str = DATALIST_NAME, synthetic_seed: int = 0) -> Path:
    """Path of the dataset's datalist; a missing or empty ``dataset_dir`` gets the built-in synthetic set.

    The synthetic fluorescence-nuclei set (:func:`s2l_monai.data.synthetic.make_synthetic_dataset`) is
    deterministic, so a fresh clone trains offline. A folder that holds files but no datalist is an error: the
    user's data are never overwritten.

    Args:
        dataset_dir: the dataset folder (config key ``dataset_dir``).
        filename: datalist file name inside it.
        synthetic_seed: seed of the synthetic set.

    Raises:
        DataError: ``dataset_dir`` holds files but no datalist.
    """
    root = Path(dataset_dir)
    path = root / filename
    if path.is_file():
        return path
    if root.is_dir() and any(root.iterdir()):
        raise DataError(
            [
                f"{root} holds no {filename}. Write one (see README: 'Train on your own images') or create it with "
                f"`s2l prepare folder --images DIR --scribbles DIR --out {root}`."
            ],
            f"dataset_dir {root}",
        )
    from s2l_monai.data.synthetic import make_synthetic_dataset

    logger.info(f"No dataset at {root}: generating the built-in synthetic nuclei set (seed {synthetic_seed}).")
    made = make_synthetic_dataset(root, seed=synthetic_seed)
    if Path(made).resolve() != path.resolve():
        raise RuntimeError(f"synthetic set wrote {made}, expected {path}")
    return path


def load_datalist(
    dataset_dir: str | os.PathLike,
    key: str = "training",
    filename: str = DATALIST_NAME,
    required: tuple[str, ...] = ("image", "scribble"),
    synthesize_if_missing: bool = True,
) -> list[dict[str, Any]]:
    """Read one section of a datalist, with absolute paths and an ``id`` per item.

    MONAI's ``load_decathlon_datalist`` only resolves ``image`` and ``label`` paths; here ``scribble`` is a path
    too, and every item gets the stable ``id`` that keys its EMA pseudo-label (:func:`item_id`, unless the item
    carries an ``id`` of its own).

    Format: ``{"training": [{"image": "images/a.png", "scribble": "scribbles/a.png", "label": "labels/a.png"}],
    "validation": [...], "test": [...]}``; relative paths are relative to the datalist's folder; ``label`` (a full
    mask) is optional and only used for evaluation.

    Args:
        dataset_dir: folder holding the datalist (or the datalist file itself).
        key: section to read.
        filename: datalist file name, when ``dataset_dir`` is a folder.
        required: keys every item must have.
        synthesize_if_missing: build the synthetic set when the folder is missing or empty
            (:func:`ensure_datalist`); the configs ask for it only for their default ``dataset_dir``, so a mistyped
            folder is an error, not a demo run.

    Returns:
        the items of the section (an empty list when the section is absent).

    Raises:
        DataError: no datalist, a datalist that is not valid JSON, items that are not objects or miss a required
            key, listed files that do not exist, or two items sharing an id (every problem, each naming its file).
    """
    given = Path(dataset_dir)
    if given.is_file():
        path = given
    elif synthesize_if_missing:
        path = ensure_datalist(given, filename)
    else:
        path = given / filename
        if not path.is_file():
            where = "folder does not exist" if not given.exists() else f"no {filename} in it"
            raise DataError([f"{given}: {where}"], "the dataset")
    root = path.parent
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError([f"{path}: not a readable JSON datalist ({exc})"], "the datalist") from None
    if not isinstance(content, dict):
        raise DataError([f"{path}: a datalist is a JSON object with 'training' etc. lists"], "the datalist")
    items = content.get(key, [])
    if not isinstance(items, list):
        raise DataError([f"{path}: {key!r} is not a list"], "the datalist")
    out: list[dict[str, Any]] = []
    problems: list[str] = []
    seen: dict[str, str] = {}
    for index, raw in enumerate(items):
        if not isinstance(raw, dict):
            problems.append(f"{path}: item {index} of {key!r} is not an object: {raw!r}")
            continue
        absent = [k for k in required if k not in raw]
        if absent:
            problems.append(f"{path}: item {index} of {key!r} has no {absent} (item: {raw})")
            continue
        item = dict(raw)
        for k in PATH_KEYS:
            if k in item:
                if not isinstance(item[k], str) or not item[k]:
                    problems.append(f"{path}: item {index} of {key!r}: {k!r} is not a file path: {item[k]!r}")
                    continue
                full = Path(item[k]) if Path(item[k]).is_absolute() else root / item[k]
                if not full.exists():
                    problems.append(f"{full}: listed in {path} ({key!r} item {index}) but does not exist")
                item[k] = str(full)
        item.setdefault("id", item_id(str(raw["image"])))
        item["id"] = str(item["id"])
        if item["id"] in seen:
            problems.append(f"{path}: items {seen[item['id']]} and {raw['image']} share the id {item['id']!r}")
        seen[item["id"]] = str(raw["image"])
        out.append(item)
    if problems:
        raise DataError(problems, f"the {key!r} list of {path}")
    return out
