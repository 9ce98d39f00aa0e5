from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from skimage.filters import threshold_otsu

from s2l_monai.data.scribbles import auto_scribbles
from s2l_monai.data.synthetic import make_synthetic_dataset, synthetic_nuclei

SMALL = {"n_train": 3, "n_val": 2, "n_test": 1, "shape": (96, 128)}


def otsu_iou(image: np.ndarray, labels: np.ndarray) -> float:
    """Foreground IoU of an Otsu threshold of ``image`` against ``labels > 0``."""
    pred, truth = image > threshold_otsu(image), labels > 0
    return float((pred & truth).sum() / (pred | truth).sum())


def has_touching_pair(labels: np.ndarray) -> bool:
    """Whether two distinct nuclei are 4-adjacent somewhere."""
    for a, b in ((labels[1:, :], labels[:-1, :]), (labels[:, 1:], labels[:, :-1])):
        if np.any((a > 0) & (b > 0) & (a != b)):
            return True
    return False


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def test_synthetic_nuclei_types_and_instances() -> None:
    image, labels = synthetic_nuclei(seed=0)
    assert image.shape == labels.shape == (256, 256)
    assert image.dtype == np.uint8 and labels.dtype == np.uint16
    ids = np.unique(labels)
    assert ids[0] == 0 and np.array_equal(ids, np.arange(len(ids)))  # sequential instance ids
    assert 10 <= labels.max() <= 35
    assert has_touching_pair(labels)
    sizes = np.bincount(labels.ravel())[1:]
    radii = np.sqrt(sizes / np.pi)
    assert sizes.min() >= 20 and 6 <= np.median(radii) <= 16
    assert image[labels > 0].mean() > 2 * image[labels == 0].mean()  # nuclei brighter, as in fluorescence


def test_synthetic_nuclei_deterministic_and_seeded() -> None:
    a = synthetic_nuclei((128, 96), seed=5)
    b = synthetic_nuclei((128, 96), seed=5)
    c = synthetic_nuclei((128, 96), seed=np.random.default_rng(5))
    d = synthetic_nuclei((128, 96), seed=6)
    assert a[0].shape == (128, 96)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    for x, y in zip(a, c):
        assert np.array_equal(x, y)
    assert not np.array_equal(a[0], d[0])


def test_touching_and_isolated_nuclei_common() -> None:
    touching = sum(has_touching_pair(synthetic_nuclei(seed=s)[1]) for s in range(8))
    assert touching >= 6
    _, labels = synthetic_nuclei(seed=0)
    blobs, n_blobs = ndimage.label(labels > 0)
    blob_ids = [len(np.unique(labels[blobs == i])) for i in range(1, n_blobs + 1)]
    assert 1 in blob_ids and max(blob_ids) >= 2  # isolated nuclei and clusters


def test_otsu_iou_realistic() -> None:
    ious = [otsu_iou(*synthetic_nuclei(seed=s)) for s in range(8)]
    # a global threshold is far from perfect (haze, vignetting, dim nuclei), yet the nuclei are there to be found
    assert 0.65 <= np.mean(ious) <= 0.82
    assert min(ious) > 0.5 and max(ious) < 0.9


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"shape": (0, 10)}, "shape"), ({"shape": (10,)}, "shape"), ({"n_nuclei": (5, 2)}, "n_nuclei")],
)
def test_synthetic_nuclei_bad_args(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        synthetic_nuclei(**kwargs)


def test_dataset_files_and_datalist(tmp_path: Path) -> None:
    path = make_synthetic_dataset(tmp_path / "synth", ratio=0.3, seed=0, **SMALL)
    root = tmp_path / "synth"
    assert path == root / "datalist.json"
    datalist = json.loads(path.read_text())
    assert datalist["scribble_values"] == {"background": 0, "foreground": 1, "unlabelled": 255}
    assert isinstance(datalist["name"], str) and isinstance(datalist["description"], str)
    assert [len(datalist[k]) for k in ("training", "validation", "test")] == [3, 2, 1]
    items = datalist["training"] + datalist["validation"] + datalist["test"]
    assert [item["image"] for item in items] == [f"images/synth_{i:03d}.png" for i in range(6)]
    for index, item in enumerate(items):
        assert set(item) == {"image", "scribble", "label"}
        for key in item.values():
            assert not Path(key).is_absolute() and (root / key).is_file()
        image, scribble, labels = (read_png(root / item[k]) for k in ("image", "scribble", "label"))
        assert image.dtype == np.uint8 and scribble.dtype == np.uint8 and labels.dtype == np.uint16
        assert image.shape == scribble.shape == labels.shape == (96, 128)
        expected_image, expected_labels = synthetic_nuclei((96, 128), seed=np.random.default_rng([0, index, 0]))
        assert np.array_equal(image, expected_image) and np.array_equal(labels, expected_labels)
        assert np.array_equal(scribble, auto_scribbles(labels, 0.3, np.random.default_rng([0, index, 1])))
        assert set(np.unique(scribble)) <= {0, 1, 255}
        assert np.all(labels[scribble == 1] > 0) and np.all(labels[scribble == 0] == 0)
    # MONAI reads it as a decathlon-style datalist with absolute paths
    from monai.data import load_decathlon_datalist  # heavy import, paid by this test only

    for split in ("training", "validation", "test"):
        loaded = load_decathlon_datalist(path, data_list_key=split, base_dir=root)
        assert all(Path(entry["scribble"]).is_file() for entry in loaded)


def test_dataset_byte_identical_on_rerun(tmp_path: Path) -> None:
    first = make_synthetic_dataset(tmp_path / "a", seed=3, **SMALL).parent
    second = make_synthetic_dataset(tmp_path / "b", seed=3, **SMALL).parent
    other = make_synthetic_dataset(tmp_path / "c", seed=4, **SMALL).parent
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    assert len(files) == 6 * 3 + 1
    for rel in files:
        assert (first / rel).read_bytes() == (second / rel).read_bytes()
    assert (first / "images/synth_000.png").read_bytes() != (other / "images/synth_000.png").read_bytes()


def test_dataset_defaults(tmp_path: Path) -> None:
    path = make_synthetic_dataset(tmp_path, shape=(48, 64))  # default split sizes, small images for speed
    datalist = json.loads(path.read_text())
    # no validation split by default: training reads none, so every scribbled image trains
    assert [len(datalist[k]) for k in ("training", "validation", "test")] == [24, 0, 12]
    assert read_png(tmp_path / datalist["test"][-1]["image"]).shape == (48, 64)
    assert "ratio 0.3" in datalist["description"]
    assert datalist["test"][-1]["label"] == "labels/synth_035.png"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"ratio": 0.0}, "ratio"), ({"ratio": 1.2}, "ratio"), ({"n_val": -1}, "split"), ({"seed": -1}, "seed")],
)
def test_dataset_bad_args(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_synthetic_dataset(tmp_path, **kwargs)
    assert not (tmp_path / "datalist.json").exists()
