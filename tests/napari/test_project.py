"""The plugin's parts without Qt: input checks, the project folder, the sample's strokes, and that the core package
imports nothing of napari. These run without the ``napari`` extra too."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from s2l_monai.data.datalist import load_datalist
from s2l_monai.napari.project import (
    BUNDLE_VALUES,
    PSEUDO_NUCLEUS,
    PSEUDO_UNSURE,
    LayerImage,
    Project,
    check_training_set,
    item_id,
    pseudo_label_map,
)
from s2l_monai.napari.sample import BACKGROUND, NUCLEUS, sample_scribbles


def _image(name="img", shape=(32, 40), scribbles=True, rgb=False):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 255, size=(*shape, 3) if rgb else shape, dtype=np.uint8)
    labels = None
    if scribbles:
        labels = np.zeros(shape, dtype=np.uint8)
        labels[..., 2:5, 2:20] = NUCLEUS
        labels[..., 20:23, 5:30] = BACKGROUND
    return LayerImage(name=name, data=data, rgb=rgb, scribbles=labels, scribble_name=f"{name} scribbles")


def test_core_package_imports_nothing_of_napari_or_qt():
    code = ("import sys, s2l_monai.cli, s2l_monai.ensemble, s2l_monai.napari, s2l_monai.napari.project, "
            "s2l_monai.napari.process, s2l_monai.napari.runner; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('napari', 'qtpy', 'PySide6', 'PyQt5', "
            "'PyQt6', 'magicgui', 'vispy')); print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "images, expected",
    [
        ([], "no image chosen"),
        ([_image(scribbles=False)], "has no scribble layer"),
        ([LayerImage("img", np.zeros((32, 40), np.uint8), scribbles=np.zeros((32, 41), np.uint8),
                     scribble_name="other")], "scribble layer 'other' has shape (32, 41) but image 'img' is (32, 40)"),
        ([LayerImage("img", np.zeros((32, 40), np.uint8), scribbles=np.zeros((32, 40), np.uint8))],
         "no scribbles yet: paint some nuclei with label 1 and some background with label 2"),
        ([LayerImage("img", np.zeros((32, 40), np.uint8), scribbles=np.where(np.eye(32, 40) > 0, 1, 0))],
         "only nucleus strokes (label 1) found: paint some background with label 2 too"),
        ([LayerImage("img", np.zeros((32, 40), np.uint8), scribbles=np.where(np.eye(32, 40) > 0, 2, 0))],
         "only background strokes (label 2) found"),
        ([_image("a"), _image("b", rgb=True)], "grey and colour (RGB) images cannot train together"),
        ([_image("a"), _image("b", shape=(3, 32, 40))], "2D images and 3D stacks cannot train together"),
        ([_image(shape=(4, 5))], "at least 8 px a side"),
    ],
)
def test_check_training_set_names_the_problem(images, expected):
    found = check_training_set(images, NUCLEUS, BACKGROUND)
    assert any(expected in p for p in found.problems), found.problems
    assert found.images == []


def test_check_training_set_label_values():
    assert "both 3" in check_training_set([_image()], 3, 3).problems[0]
    assert any("value 0" in p for p in check_training_set([_image()], 0, 2).problems)


def test_check_training_set_accepts_and_notes():
    empty = LayerImage("empty", np.zeros((32, 40), np.uint8), scribbles=np.zeros((32, 40), np.uint8),
                       scribble_name="empty scribbles")
    odd = _image("odd")
    odd.scribbles[10, 10] = 7
    found = check_training_set([_image("a"), empty, odd], NUCLEUS, BACKGROUND)
    assert found.problems == []
    assert [i.name for i in found.images] == ["a", "odd"]
    assert any("'empty' has no strokes yet" in n for n in found.notes)
    assert any("label values [7]" in n for n in found.notes)
    assert not found.volumes and found.in_channels == 1
    stacks = check_training_set([_image("s", shape=(3, 32, 40))], NUCLEUS, BACKGROUND)
    assert stacks.problems == [] and stacks.volumes
    assert check_training_set([_image("c", rgb=True)], NUCLEUS, BACKGROUND).in_channels == 3


def test_write_training_set_gives_a_bundle_datalist(tmp_path):
    grey = _image("my image")
    floaty = LayerImage("float image", np.linspace(-1, 3, 32 * 40).reshape(32, 40), scribbles=grey.scribbles)
    found = check_training_set([grey, floaty], NUCLEUS, BACKGROUND)
    project = Project(tmp_path / "p")
    project.write_training_set(found, NUCLEUS, BACKGROUND)
    items = load_datalist(project.dataset_dir, "training", synthesize_if_missing=False)
    assert [i["id"] for i in items] == [item_id("my image"), item_id("float image")]
    from PIL import Image

    scribble = np.asarray(Image.open(items[0]["scribble"]))
    assert set(np.unique(scribble)) == set(BUNDLE_VALUES.values())
    assert np.array_equal(scribble == BUNDLE_VALUES["foreground"], grey.scribbles == NUCLEUS)
    assert np.array_equal(scribble == BUNDLE_VALUES["background"], grey.scribbles == BACKGROUND)
    assert np.array_equal(np.asarray(Image.open(items[0]["image"])), grey.data)
    rescaled = np.asarray(Image.open(items[1]["image"]))
    assert rescaled.dtype == np.uint16 and rescaled.min() == 0 and rescaled.max() == 65535
    assert json.loads((project.dataset_dir / "datalist.json").read_text())["scribble_values"] == BUNDLE_VALUES


def test_write_training_set_volume(tmp_path):
    from s2l_monai.volumes import read_volume

    stack = _image("stack", shape=(3, 32, 40))
    stack.scribbles[1:] = 0  # strokes on the first slice only
    found = check_training_set([stack], NUCLEUS, BACKGROUND)
    items = Project(tmp_path).write_training_set(found, NUCLEUS, BACKGROUND)
    volume, _ = read_volume(tmp_path / "dataset" / items[0]["scribble"])
    assert volume.shape == (3, 32, 40) and set(np.unique(volume[1:])) == {BUNDLE_VALUES["unlabelled"]}


def test_refresh_ema_store_keeps_unchanged_images_only(tmp_path):
    project = Project(tmp_path)
    a, b = _image("a"), _image("b")
    found = check_training_set([a, b], NUCLEUS, BACKGROUND)
    project.record_sources(found)
    ema = project.run_dir / "ema"
    ema.mkdir(parents=True)
    for name in ("a", "b"):
        np.save(ema / f"{item_id(name)}.npy", np.zeros((1, 32, 40), np.float16))
    a.scribbles[5, 5] = NUCLEUS  # new strokes: the image is the same, its pseudo-label stays
    b.data = b.data.copy()
    b.data[0, 0] ^= 1  # the image changed: its pseudo-label goes
    kept = project.refresh_ema_store(check_training_set([a, b], NUCLEUS, BACKGROUND))
    assert kept == {"reused": ["a"], "reset": ["b"]}
    assert (ema / f"{item_id('a')}.npy").exists() and not (ema / f"{item_id('b')}.npy").exists()


def test_pseudo_label_map():
    fg = np.array([[0.95, 0.5, 0.05, np.nan]], dtype=np.float32)
    prob = np.stack([1 - fg, fg])
    assert pseudo_label_map(prob, 0.8).tolist() == [[PSEUDO_NUCLEUS, PSEUDO_UNSURE, 0, PSEUDO_UNSURE]]


def test_sample_scribbles_are_strokes_inside_their_class():
    from s2l_monai.data.synthetic import synthetic_nuclei

    _, labels = synthetic_nuclei((128, 128), seed=1)
    strokes = sample_scribbles(labels)
    assert set(np.unique(strokes)) == {0, NUCLEUS, BACKGROUND}
    assert np.all(labels[strokes == NUCLEUS] > 0) and np.all(labels[strokes == BACKGROUND] == 0)
    assert 0.005 < np.mean(strokes > 0) < 0.2  # a few strokes, not a mask


def test_model_save_as_bundle_and_load(tmp_path):
    import torch
    from s2l_testing import default_network

    from s2l_monai.napari.process import configs_dir, zoo_weights
    from s2l_monai.napari.project import model_in_channels

    project = Project(tmp_path / "p")
    with pytest.raises(FileNotFoundError, match="train first"):
        project.save_bundle(tmp_path / "bundle", configs_dir())
    project.models_dir.mkdir(parents=True)
    network = default_network()
    torch.save(network.state_dict(), project.model_path)
    (project.models_dir / "model.calibration.json").write_text('{"foreground_threshold": 0.35}')
    saved = project.save_bundle(tmp_path / "bundle", configs_dir())
    assert saved == tmp_path / "bundle" / "models" / "model.pt"
    assert (tmp_path / "bundle" / "configs" / "inference.json").is_file()
    other = Project(tmp_path / "q")
    other.models_dir.mkdir(parents=True)
    (other.models_dir / "model.calibration.json").write_text('{"foreground_threshold": 0.7}')  # a stale one
    assert other.load_model(tmp_path / "bundle") == other.model_path  # a bundle folder, or its model.pt
    # the model's foreground threshold travels with it both ways
    assert '"foreground_threshold": 0.35' in (other.models_dir / "model.calibration.json").read_text()
    (tmp_path / "bundle" / "models" / "model.calibration.json").unlink()
    other.model_path.unlink()
    other.load_model(tmp_path / "bundle")
    assert not (other.models_dir / "model.calibration.json").exists()  # none: no stale threshold left behind
    loaded = torch.load(other.model_path, map_location="cpu", weights_only=True)
    assert all(torch.equal(loaded[k], v) for k, v in network.state_dict().items())
    assert model_in_channels(other.model_path) == 1
    with pytest.raises(FileNotFoundError):
        other.load_model(tmp_path / "nowhere.pt")
    zoo = zoo_weights()
    assert zoo is not None and model_in_channels(zoo) == 1  # the zoo's weights take grey images
