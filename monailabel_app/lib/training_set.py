"""Turn the datastore's saved scribble labels into a bundle dataset (datalist + scribble maps in bundle values).

Also keeps the EMA pseudo-label store consistent across training runs: the store is keyed by item id (the
datastore image id), and an item's stored average is dropped when its image content changed since it was made (a
SHA-256 of the image file is recorded per item), so only unchanged images reuse the previous run's ensemble.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lib.image_io import read_image, read_label
from lib.scribble_labels import BUNDLE_VALUES, label_values, scribble_counts, to_bundle_scribbles, unknown_values

__all__ = ["DATALIST_NAME", "LabelledImage", "file_sha256", "prepare_training_set", "refresh_ema_store"]

logger = logging.getLogger(__name__)

DATALIST_NAME = "datalist_monailabel.json"
SOURCES_NAME = "ema_sources.json"
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class LabelledImage:
    """One datastore image with its saved (final) label.

    Attributes:
        id: the datastore image id (also the item id of the EMA store).
        image: path of the image.
        label: path of the label.
        label_info: the info saved with the label (``label_info`` names the segments' values).
    """

    id: str
    image: str
    label: str
    label_info: Mapping[str, Any]


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def prepare_training_set(
    items: Sequence[LabelledImage], out_dir: str | os.PathLike, labels: Mapping[str, int]
) -> tuple[Path, list[dict[str, Any]], bool]:
    """Write bundle scribble maps and a datalist for the labelled images.

    Args:
        items: the labelled images.
        out_dir: dataset folder (rewritten: ``scribbles/`` and the datalist).
        labels: the model's labels (``{"nucleus": 1}``), for the default segment values.

    Returns:
        the datalist path, its training items, and whether the items are volumes.

    Raises:
        ValueError: no usable item, 2D images mixed with volumes, a label whose shape differs from its image, or
            a label without any scribble.
    """
    out = Path(out_dir)
    scribble_dir = out / "scribbles"
    if scribble_dir.exists():
        shutil.rmtree(scribble_dir)
    scribble_dir.mkdir(parents=True)
    training: list[dict[str, Any]] = []
    kinds: set[bool] = set()
    for item in items:
        image = read_image(item.image)
        label = read_label(item.label)
        if label.spatial_shape != image.spatial_shape:
            raise ValueError(f"{item.id}: label shape {label.spatial_shape} != image shape {image.spatial_shape}")
        mapping = label_values(labels, item.label_info.get("label_info"))
        unknown = unknown_values(label.array, mapping)
        if unknown:
            logger.warning(f"{item.id}: label values {unknown} name no scribble segment; read as unlabelled")
        scribbles = to_bundle_scribbles(label.array, mapping)
        counts = scribble_counts(scribbles)
        if counts["background"] + counts["foreground"] == 0:
            logger.warning(f"{item.id}: the saved label holds no scribble; skipped")
            continue
        kinds.add(image.volume)
        name = _SAFE.sub("_", item.id)
        if image.volume:
            from s2l_monai.volumes import write_volume

            path = write_volume(scribble_dir / f"{name}.tif", scribbles)
        else:
            from s2l_monai.inference_io import write_array

            path = write_array(scribble_dir / f"{name}.png", scribbles)
        logger.info(f"{item.id}: scribbles {counts} (values {mapping})")
        image_path = str(Path(item.image).resolve())
        training.append({"image": image_path, "scribble": str(path.relative_to(out)), "id": item.id})
    if not training:
        raise ValueError("no saved label holds scribbles: draw foreground and background scribbles and save them first")
    if len(kinds) > 1:
        raise ValueError("the labelled images mix 2D images and 3D volumes; train on one kind at a time")
    datalist = out / DATALIST_NAME
    datalist.write_text(json.dumps({"scribble_values": BUNDLE_VALUES, "training": training}, indent=1))
    return datalist, training, kinds.pop()


def refresh_ema_store(ema_dir: str | os.PathLike, training: Sequence[Mapping[str, Any]], num_classes: int) -> dict:
    """Drop the stored EMA of every item whose image changed since it was made; record the current hashes.

    Args:
        ema_dir: the EMA store folder (``<output_dir>/ema``).
        training: datalist items with absolute ``image`` paths and ``id``.
        num_classes: classes of the network (for the store's metadata).

    Returns:
        ``{"reused": [...ids], "reset": [...ids]}``.
    """
    from s2l_monai.ensemble import EMAStore

    store = EMAStore(ema_dir, num_classes=num_classes)
    sources_path = Path(ema_dir) / SOURCES_NAME
    known = json.loads(sources_path.read_text()) if sources_path.is_file() else {}
    reused, reset = [], []
    current: dict[str, str] = {}
    for item in training:
        item_id = str(item["id"])
        digest = file_sha256(item["image"])
        current[item_id] = digest
        if item_id in store:
            if known.get(item_id) == digest:
                reused.append(item_id)
            else:
                store.path(item_id).unlink(missing_ok=True)
                reset.append(item_id)
    sources_path.write_text(json.dumps({**known, **current}, indent=1))
    logger.info(f"EMA store {ema_dir}: reused for {reused}; reset (image changed) for {reset}")
    return {"reused": reused, "reset": reset}

