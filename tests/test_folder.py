"""Tests of the user-folder preparer (``prepare_folder``) and its command line (``s2l prepare folder``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from s2l_monai.data.folder import prepare_folder

REPO_ROOT = Path(__file__).resolve().parents[1]
H, W = 24, 32


def _scribble(seed: int) -> np.ndarray:
    scribble = np.full((H, W), 255, np.uint8)
    scribble[5, 3 + seed % 5 : 20] = 1
    scribble[18, 2:12] = 0
    return scribble


def make_dataset(root: Path, n: int = 5, labels: bool = True) -> Path:
    """``root/images`` (PNG grey, one RGB TIFF), ``root/scribbles`` (mixed suffixes), ``root/labels``."""
    rng = np.random.default_rng(0)
    for sub in ("images", "scribbles", "labels"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        name = f"img{i}"
        if i == 0:
            tifffile.imwrite(root / "images" / f"{name}.tif", rng.integers(0, 255, (H, W, 3), dtype=np.uint8))
        else:
            Image.fromarray(rng.integers(0, 255, (H, W), dtype=np.uint8)).save(root / "images" / f"{name}.png")
        suffix = ("", "_scribble", "_scribbles")[i % 3]
        Image.fromarray(_scribble(i)).save(root / "scribbles" / f"{name}{suffix}.png")
        if labels:
            label = np.zeros((H, W), np.uint16)
            label[3:8, 3:20] = 1
            tifffile.imwrite(root / "labels" / f"{name}_label.tif", label)
    return root


def _all_items(datalist: dict) -> list[dict]:
    return datalist["training"] + datalist["validation"] + datalist["test"]


def test_good_folder(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data")
    path = prepare_folder(root / "images", root / "scribbles", labels_dir=root / "labels", val_fraction=0.2)
    assert path == (root / "datalist.json").resolve()
    datalist = json.loads(path.read_text())
    assert datalist["scribble_values"] == {"background": 0, "foreground": 1, "unlabelled": 255}
    assert (len(datalist["training"]), len(datalist["validation"]), len(datalist["test"])) == (4, 1, 0)
    default = json.loads(prepare_folder(root / "images", root / "scribbles").read_text())
    assert (len(default["training"]), len(default["validation"])) == (5, 0)  # every scribble trains by default
    items = _all_items(datalist)
    assert sorted(Path(it["image"]).stem for it in items) == [f"img{i}" for i in range(5)]
    for item in items:
        assert set(item) == {"image", "scribble", "label"}
        assert not Path(item["image"]).is_absolute()
        assert all((root / p).is_file() for p in item.values())
        assert Path(item["scribble"]).stem.startswith(Path(item["image"]).stem)
    assert datalist["validation"][0]["scribble"].startswith("scribbles/")  # validation keeps its scribble


def test_split_is_seeded(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data", n=20, labels=False)
    first = json.loads(prepare_folder(root / "images", root / "scribbles", val_fraction=0.2, test_fraction=0.1,
                                      seed=3).read_text())
    assert (len(first["training"]), len(first["validation"]), len(first["test"])) == (14, 4, 2)
    assert "label" not in first["training"][0]
    again = json.loads(prepare_folder(root / "images", root / "scribbles", val_fraction=0.2, test_fraction=0.1,
                                      seed=3).read_text())
    assert again == first
    other = json.loads(prepare_folder(root / "images", root / "scribbles", val_fraction=0.2, test_fraction=0.1,
                                      seed=4).read_text())
    assert other["validation"] != first["validation"]


def test_out_dir_elsewhere_gives_relative_paths(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data", labels=False)
    path = prepare_folder(root / "images", root / "scribbles", out_dir=tmp_path / "elsewhere")
    assert path == (tmp_path / "elsewhere" / "datalist.json").resolve()
    for item in _all_items(json.loads(path.read_text())):
        assert all(p.startswith("../data/") and (path.parent / p).is_file() for p in item.values())


def test_same_folder_with_suffixes(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((H, W), np.uint8)).save(folder / f"cell{i}.png")
        Image.fromarray(_scribble(i)).save(folder / f"cell{i}_scribble.png")
    datalist = json.loads(prepare_folder(folder, folder).read_text())
    items = _all_items(datalist)
    assert sorted(it["image"] for it in items) == ["cell0.png", "cell1.png", "cell2.png"]
    assert all(it["scribble"] == it["image"].replace(".png", "_scribble.png") for it in items)


def test_custom_values(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data", n=3, labels=False)
    for path in (root / "scribbles").glob("*.png"):
        s = np.asarray(Image.open(path)).copy()
        s[s == 255] = 250
        Image.fromarray(s).save(path)
    with pytest.raises(ValueError, match="250"):
        prepare_folder(root / "images", root / "scribbles")
    values = {"background": 0, "foreground": 1, "unlabelled": 250}
    datalist = json.loads(prepare_folder(root / "images", root / "scribbles", values=values).read_text())
    assert datalist["scribble_values"] == values


def _problems(exc: pytest.ExceptionInfo[ValueError]) -> list[str]:
    return [line[4:] for line in str(exc.value).splitlines() if line.startswith("  - ")]


def test_missing_scribble_named(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data")
    (root / "scribbles" / "img1_scribble.png").unlink()
    with pytest.raises(ValueError) as info:
        prepare_folder(root / "images", root / "scribbles")
    problems = _problems(info)
    assert len(problems) == 1 and "img1.png" in problems[0] and "no scribble" in problems[0]


def test_missing_label_named(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data")
    (root / "labels" / "img2_label.tif").unlink()
    with pytest.raises(ValueError, match=r"img2\.png: no label file"):
        prepare_folder(root / "images", root / "scribbles", labels_dir=root / "labels")


def test_shape_mismatch_named(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data")
    Image.fromarray(np.zeros((H + 1, W), np.uint8)).save(root / "scribbles" / "img4_scribble.png")
    tifffile.imwrite(root / "labels" / "img3_label.tif", np.zeros((H, W + 2), np.uint16))
    with pytest.raises(ValueError) as info:
        prepare_folder(root / "images", root / "scribbles", labels_dir=root / "labels")
    problems = _problems(info)
    assert len(problems) == 2
    assert any("img4_scribble.png" in p and "shape" in p for p in problems)
    assert any("img3_label.tif" in p and "shape" in p for p in problems)


def test_bad_values_named(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data")
    scribble = _scribble(0)
    scribble[0, 0] = 7
    Image.fromarray(scribble).save(root / "scribbles" / "img3.png")
    with pytest.raises(ValueError) as info:
        prepare_folder(root / "images", root / "scribbles")
    problems = _problems(info)
    assert len(problems) == 1 and "img3.png" in problems[0] and "[7]" in problems[0]


def test_empty_scribble_is_kept_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_dataset(tmp_path / "data")
    Image.fromarray(np.full((H, W), 255, np.uint8)).save(root / "scribbles" / "img3.png")
    with caplog.at_level("WARNING"):
        path = prepare_folder(root / "images", root / "scribbles", val_fraction=0)
    assert "1 of 5 image(s) have no scribbled pixel" in caplog.text and "img3.png" in caplog.text
    listed = json.loads(path.read_text())["training"]
    assert any(item["image"].endswith("img3.png") for item in listed)  # still segmented by inference
    for scribble in (root / "scribbles").iterdir():  # no scribble at all: nothing to train on
        Image.fromarray(np.full((H, W), 255, np.uint8)).save(scribble)
    with pytest.raises(ValueError, match="no scribble has a labelled pixel"):
        prepare_folder(root / "images", root / "scribbles")


def test_all_problems_reported_together(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data", n=6)
    (root / "scribbles" / "img1_scribble.png").unlink()  # missing
    Image.fromarray(np.zeros((H, W + 1), np.uint8)).save(root / "scribbles" / "img2_scribbles.png")  # shape
    bad = _scribble(3)
    bad[1, 1] = 9
    Image.fromarray(bad).save(root / "scribbles" / "img3.png")  # values
    tifffile.imwrite(root / "images" / "img4.tif", np.full((H, W), np.nan, np.float32))  # NaN image
    (root / "images" / "img4.png").unlink()
    Image.fromarray(_scribble(0)).save(root / "scribbles" / "stray.png")  # orphan
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(root / "scribbles" / "img5_scribbles.png")  # RGB scribble
    with pytest.raises(ValueError) as info:
        prepare_folder(root / "images", root / "scribbles")
    problems = _problems(info)
    assert str(info.value).startswith("6 problem(s)")
    expected = ["img1.png", "img2_scribbles.png", "img3.png", "img4.tif", "stray.png", "img5_scribbles.png"]
    for name in expected:
        assert any(name in p for p in problems), name
    assert not (root / "datalist.json").exists()


def test_ambiguous_and_duplicate_names(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data", n=3, labels=False)
    Image.fromarray(_scribble(0)).save(root / "scribbles" / "img0_scribbles.png")  # img0.png exists too
    tifffile.imwrite(root / "images" / "img1.tiff", np.zeros((H, W), np.uint8))  # img1.png exists too
    with pytest.raises(ValueError) as info:
        prepare_folder(root / "images", root / "scribbles")
    text = str(info.value)
    assert "several scribble files" in text and "img0_scribbles.png" in text
    assert "several images share the base name 'img1'" in text


def test_bad_parameters(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data", n=3, labels=False)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        prepare_folder(tmp_path / "nowhere", root / "scribbles")
    with pytest.raises(ValueError, match="differ"):
        prepare_folder(root / "images", root / "scribbles", values={"background": 0, "foreground": 0, "unlabelled": 1})
    with pytest.raises(ValueError, match="val_fraction"):
        prepare_folder(root / "images", root / "scribbles", val_fraction=0.6, test_fraction=0.5)


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "s2l_monai", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )


def test_cli_prepare_folder(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data")
    out = tmp_path / "data"
    result = _run_cli("prepare", "folder", "--images", str(root / "images"), "--scribbles", str(root / "scribbles"),
                      "--labels", str(root / "labels"), "--out", str(out), "--val-fraction", "0.4", "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert "datalist.json" in result.stdout
    datalist = json.loads((out / "datalist.json").read_text())
    assert (len(datalist["training"]), len(datalist["validation"])) == (3, 2)

    (root / "scribbles" / "img1_scribble.png").unlink()
    result = _run_cli("prepare", "folder", "--images", str(root / "images"), "--scribbles", str(root / "scribbles"),
                      "--out", str(out))
    assert result.returncode == 2
    assert "img1.png" in result.stderr and "Traceback" not in result.stderr


def test_cli_help() -> None:
    result = _run_cli("prepare", "--help")
    assert result.returncode == 0 and "dsb2018" in result.stdout and "folder" in result.stdout
