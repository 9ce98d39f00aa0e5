"""Datalists: the MONAI-style JSON that lists images, scribbles and (optional) full masks."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

__all__ = ["DATALIST_NAME", "load_datalist", "ensure_datalist", "item_id"]

DATALIST_NAME = "datalist.json"
PATH_KEYS = ("image", "scribble", "label")
_EXTENSIONS = re.compile(r"(\.nii\.gz|\.ome\.tiff?|\.[A-Za-z0-9]+)$")

logger = logging.getLogger(__name__)


def item_id(image_path: str) -> str:
    """Stable id of an item: its image path relative to the dataset, without extension, ``/`` replaced by ``__``."""
    return _EXTENSIONS.sub("", image_path.replace("\\", "/")).strip("/").replace("/", "__")


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
        FileNotFoundError: ``dataset_dir`` holds files but no datalist.
    """
    root = Path(dataset_dir)
    path = root / filename
    if path.is_file():
        return path
    if root.is_dir() and any(root.iterdir()):
        raise FileNotFoundError(
            f"{root} holds no {filename}. Write one (see README: 'Train on your own images') or create it with "
            f"`s2l prepare folder --images DIR --scribbles DIR --out {root}`."
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
            (:func:`ensure_datalist`).

    Returns:
        the items of the section (an empty list when the section is absent).

    Raises:
        FileNotFoundError: a listed file does not exist (all such files are listed).
        ValueError: an item misses a required key, or two items share an id.
    """
    given = Path(dataset_dir)
    if given.is_file():
        path = given
    elif synthesize_if_missing:
        path = ensure_datalist(given, filename)
    else:
        path = given / filename
        if not path.is_file():
            raise FileNotFoundError(f"no datalist at {path}")
    root = path.parent
    content = json.loads(path.read_text())
    items = content.get(key, [])
    out: list[dict[str, Any]] = []
    missing: list[str] = []
    seen: dict[str, str] = {}
    for index, raw in enumerate(items):
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: item {index} of {key!r} is not an object: {raw!r}")
        absent = [k for k in required if k not in raw]
        if absent:
            raise ValueError(f"{path}: item {index} of {key!r} has no {absent} (item: {raw})")
        item = dict(raw)
        for k in PATH_KEYS:
            if k in item:
                full = Path(item[k]) if Path(item[k]).is_absolute() else root / item[k]
                if not full.exists():
                    missing.append(str(full))
                item[k] = str(full)
        item.setdefault("id", item_id(str(raw["image"])))
        item["id"] = str(item["id"])
        if item["id"] in seen:
            raise ValueError(f"{path}: items {seen[item['id']]} and {raw['image']} share the id {item['id']!r}")
        seen[item["id"]] = str(raw["image"])
        out.append(item)
    if missing:
        raise FileNotFoundError(f"{path}: {len(missing)} listed file(s) do not exist: " + ", ".join(missing[:20]))
    return out
