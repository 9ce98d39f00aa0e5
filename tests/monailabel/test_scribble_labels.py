"""Unit tests of the app's MONAI-Label-free parts: scribble value mapping, label reading, the training set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from lib.image_io import read_label
from lib.scribble_labels import BUNDLE_VALUES, default_label_values, label_values, to_bundle_scribbles
from lib.training_set import LabelledImage, prepare_training_set, refresh_ema_store
from PIL import Image

LABELS = {"nucleus": 1}


def test_default_values_follow_monai_label():
    assert default_label_values(LABELS) == {1: "nucleus", 2: "background_scribbles", 3: "foreground_scribbles"}


def test_default_mapping_and_encoding():
    mapping = label_values(LABELS)
    assert mapping == {1: 1, 2: 0, 3: 1}
    label = np.array([[0, 1, 2, 3, 7]], np.uint8)
    assert to_bundle_scribbles(label, mapping).tolist() == [[255, 1, 0, 1, 255]]


def test_label_info_overrides_values():
    # 3D Slicer style: segments named by the user, values in segment order ("idx"); MONAI Label style: "id".
    info = [{"name": "nucleus", "idx": 1}, {"name": "not_nucleus", "idx": 2}, {"name": "foreground_scribbles", "id": 5}]
    mapping = label_values(LABELS, info)
    assert mapping[1] == BUNDLE_VALUES["foreground"] and mapping[2] == BUNDLE_VALUES["background"]
    assert mapping[5] == BUNDLE_VALUES["foreground"]


def test_no_scribble_segment_is_an_error():
    with pytest.raises(ValueError, match="no scribble segment"):
        label_values({}, [{"name": "liver", "idx": 1}, {"name": "spleen", "idx": 2}, {"name": "x", "idx": 3}])


def test_read_label_refuses_colour(tmp_path: Path):
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[0, 0] = (1, 2, 3)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    with pytest.raises(ValueError, match="different channels"):
        read_label(tmp_path / "c.png")
    Image.fromarray(np.full((4, 5, 3), 2, np.uint8)).save(tmp_path / "g.png")
    assert read_label(tmp_path / "g.png").array.shape == (4, 5)


def _item(tmp_path: Path, name: str, label: np.ndarray, pixel: int = 9) -> LabelledImage:
    image = tmp_path / f"{name}.png"
    Image.fromarray(np.full(label.shape, pixel, np.uint8)).save(image)
    path = tmp_path / f"{name}_label.png"
    Image.fromarray(label).save(path)
    return LabelledImage(id=name, image=str(image), label=str(path), label_info={})


def test_training_set_and_ema_reuse(tmp_path: Path):
    label = np.zeros((8, 8), np.uint8)
    label[1, 1:4], label[6, 2:7] = 3, 2
    empty = np.zeros((8, 8), np.uint8)
    items = [_item(tmp_path, "a", label), _item(tmp_path, "b", label), _item(tmp_path, "empty", empty)]
    datalist, training, volumes = prepare_training_set(items, tmp_path / "ds", LABELS)
    assert not volumes and [t["id"] for t in training] == ["a", "b"]  # the label without scribbles is skipped
    content = json.loads(datalist.read_text())
    assert content["scribble_values"] == BUNDLE_VALUES
    scribble = np.asarray(Image.open(datalist.parent / training[0]["scribble"]))
    assert scribble[1, 1] == 1 and scribble[6, 2] == 0 and scribble[0, 0] == 255

    ema = tmp_path / "ema"
    assert refresh_ema_store(ema, training, 2) == {"reused": [], "reset": []}
    from s2l_monai.ensemble import EMAStore

    store = EMAStore(ema, num_classes=2)
    for item_id in ("a", "b"):
        np.save(store.path(item_id), np.zeros((1, 8, 8), np.float16))
    Image.fromarray(np.full((8, 8), 50, np.uint8)).save(training[1]["image"])  # image b changes
    assert refresh_ema_store(ema, training, 2) == {"reused": ["a"], "reset": ["b"]}
    assert "a" in store and "b" not in store
