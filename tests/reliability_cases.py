"""The malformed-input corpus of the reliability tests and benchmark (issue 15), generated, never stored.

Each case builds a small dataset (3 images of 64x64 with scribbles and labels) and then breaks one thing in it.
:data:`TRAINING_CASES` are run as ``python -m monai.bundle run training`` in a subprocess by
``tests/test_reliability.py`` and ``benchmarks/reliability.py``: each must exit non-zero with one short message
that names the broken file (or folder), without a traceback, and leave every input file unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
SIZE = 64


def write_dataset(root: Path, n: int = 3, size: int = SIZE, seed: int = 0) -> Path:
    """``n`` grey images with two bright nuclei each, their labels and scribbles (both classes); returns ``root``."""
    rng = np.random.default_rng(seed)
    for sub in ("images", "scribbles", "labels"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:size, :size]
    training = []
    for k in range(n):
        label = np.zeros((size, size), np.uint16)
        for j, (cy, cx) in enumerate([(size // 3, size // 3), (2 * size // 3, 2 * size // 3)]):
            cy, cx = cy + int(rng.integers(-3, 4)), cx + int(rng.integers(-3, 4))
            label[(yy - cy) ** 2 + (xx - cx) ** 2 < (size // 8) ** 2] = j + 1
        image = (30 + 170 * (label > 0) + rng.normal(0, 12, label.shape)).clip(0, 255).astype(np.uint8)
        scribble = np.full((size, size), 255, np.uint8)
        for j in (1, 2):
            ys, xs = np.nonzero(label == j)
            scribble[int(ys.mean()), int(xs.min()) + 2 : int(xs.max()) - 1] = 1
        scribble[2, 2 : size - 2] = 0
        scribble[size - 3, 2 : size - 2] = 0
        name = f"img{k}"
        Image.fromarray(image).save(root / "images" / f"{name}.png")
        Image.fromarray(scribble).save(root / "scribbles" / f"{name}.png")
        Image.fromarray(label).save(root / "labels" / f"{name}.png")
        training.append(
            {"image": f"images/{name}.png", "scribble": f"scribbles/{name}.png", "label": f"labels/{name}.png"}
        )
    (root / "datalist.json").write_text(json.dumps({"training": training, "validation": [], "test": []}, indent=1))
    return root


def _datalist(root: Path) -> dict:
    return json.loads((root / "datalist.json").read_text())


def _set_datalist(root: Path, content: object) -> None:
    (root / "datalist.json").write_text(json.dumps(content))


def _replace_image(root: Path, k: int, array: np.ndarray, ext: str = ".tif") -> Path:
    """Make item ``k``'s image the given array (as TIFF unless ``ext`` says otherwise); returns the new path."""
    content = _datalist(root)
    old = root / content["training"][k]["image"]
    new = old.with_suffix(ext)
    old.unlink()
    if ext in (".tif", ".tiff"):
        tifffile.imwrite(new, array)
    else:
        Image.fromarray(array).save(new)
    content["training"][k]["image"] = str(new.relative_to(root))
    _set_datalist(root, content)
    return new


def _scribble_path(root: Path, k: int) -> Path:
    return root / _datalist(root)["training"][k]["scribble"]


def _image_array(root: Path, k: int) -> np.ndarray:
    return np.asarray(Image.open(root / _datalist(root)["training"][k]["image"]))


# each case: (root) -> (text the error must contain, extra CLI overrides)
def _nan_patch(root: Path):
    a = _image_array(root, 0).astype(np.float32)
    a[5:9, 5:9] = np.nan
    return str(_replace_image(root, 0, a)), []


def _all_nan(root: Path):
    return str(_replace_image(root, 1, np.full((SIZE, SIZE), np.nan, np.float32))), []


def _inf_pixels(root: Path):
    a = _image_array(root, 2).astype(np.float32)
    a[0, :4] = np.inf
    a[1, :4] = -np.inf
    return str(_replace_image(root, 2, a)), []


def _empty_image(root: Path):
    path = root / "images" / "img0.png"
    path.write_bytes(b"")
    return str(path), []


def _truncated_png(root: Path):
    path = root / "images" / "img1.png"
    path.write_bytes(path.read_bytes()[:60])
    return str(path), []


def _text_as_png(root: Path):
    path = root / "images" / "img2.png"
    path.write_text("this is not an image\n")
    return str(path), []


def _one_pixel_image(root: Path):
    path = _replace_image(root, 0, np.full((1, 1), 100, np.uint8), ".png")
    Image.fromarray(np.full((1, 1), 1, np.uint8)).save(_scribble_path(root, 0))
    return str(path), []


def _seven_channels(root: Path):
    return str(_replace_image(root, 1, np.zeros((SIZE, SIZE, 7), np.uint8))), []


def _scribble_other_shape(root: Path):
    path = _scribble_path(root, 0)
    Image.fromarray(np.full((SIZE, SIZE + 5), 255, np.uint8)).save(path)
    return str(path), []


def _scribble_value_7(root: Path):
    path = _scribble_path(root, 1)
    a = np.asarray(Image.open(path)).copy()
    a[10, 10:20] = 7
    Image.fromarray(a).save(path)
    return str(path), []


def _scribble_value_2(root: Path):
    path = _scribble_path(root, 2)
    a = np.asarray(Image.open(path)).copy()
    a[30, 30] = 2
    Image.fromarray(a).save(path)
    return str(path), []


def _scribble_rgb(root: Path):
    path = _scribble_path(root, 0)
    a = np.asarray(Image.open(path))
    Image.fromarray(np.stack([a] * 3, -1)).save(path)
    return str(path), []


def _scribble_empty_file(root: Path):
    path = _scribble_path(root, 1)
    path.write_bytes(b"")
    return str(path), []


def _scribble_nan_tiff(root: Path):
    content = _datalist(root)
    a = np.asarray(Image.open(_scribble_path(root, 2))).astype(np.float32)
    a[0, 0] = np.nan
    path = root / "scribbles" / "img2_float.tif"
    tifffile.imwrite(path, a)
    content["training"][2]["scribble"] = "scribbles/img2_float.tif"
    _set_datalist(root, content)
    return str(path), []


def _scribble_jpeg(root: Path):
    content = _datalist(root)
    a = np.asarray(Image.open(_scribble_path(root, 0)))
    path = root / "scribbles" / "img0.jpg"
    Image.fromarray(a).save(path, quality=70)
    content["training"][0]["scribble"] = "scribbles/img0.jpg"
    _set_datalist(root, content)
    return str(path), []


def _missing_image(root: Path):
    path = root / "images" / "img1.png"
    path.unlink()
    return str(path), []


def _missing_scribble(root: Path):
    path = _scribble_path(root, 2)
    path.unlink()
    return str(path), []


def _label_other_shape(root: Path):
    path = root / "labels" / "img0.png"
    Image.fromarray(np.zeros((SIZE - 1, SIZE), np.uint8)).save(path)
    return str(path), []


def _malformed_json(root: Path):
    (root / "datalist.json").write_text('{"training": [')
    return str(root / "datalist.json"), []


def _datalist_is_a_list(root: Path):
    _set_datalist(root, _datalist(root)["training"])
    return str(root / "datalist.json"), []


def _training_not_a_list(root: Path):
    _set_datalist(root, {"training": {"image": "images/img0.png"}})
    return str(root / "datalist.json"), []


def _item_not_an_object(root: Path):
    content = _datalist(root)
    content["training"].append("images/img0.png")
    _set_datalist(root, content)
    return str(root / "datalist.json"), []


def _item_without_scribble(root: Path):
    content = _datalist(root)
    del content["training"][1]["scribble"]
    _set_datalist(root, content)
    return str(root / "datalist.json"), []


def _path_not_a_string(root: Path):
    content = _datalist(root)
    content["training"][0]["scribble"] = 17
    _set_datalist(root, content)
    return str(root / "datalist.json"), []


def _empty_training_list(root: Path):
    _set_datalist(root, {"training": []})
    return "training list is empty", []


def _duplicate_items(root: Path):
    content = _datalist(root)
    content["training"].append(dict(content["training"][0]))
    _set_datalist(root, content)
    return str(root / "datalist.json"), []


def _dataset_dir_typo(root: Path):
    return str(root) + "_typo", ["--dataset_dir", str(root) + "_typo"]


def _folder_without_datalist(root: Path):
    (root / "datalist.json").unlink()
    return str(root), []


def _erase_class(root: Path, value: int) -> None:
    """Turn every scribble pixel of ``value`` unlabelled (255), in all three scribbles."""
    for k in range(3):
        path = _scribble_path(root, k)
        a = np.asarray(Image.open(path)).copy()
        a[a == value] = 255
        Image.fromarray(a).save(path)


def _no_foreground(root: Path):
    _erase_class(root, 1)
    return "no training scribble has a foreground stroke", []


def _no_background(root: Path):
    _erase_class(root, 0)
    return "no training scribble has a background stroke", []


def _no_scribble_at_all(root: Path):
    for k in range(3):
        Image.fromarray(np.full((SIZE, SIZE), 255, np.uint8)).save(_scribble_path(root, k))
    return "none of the 3 training scribbles has a labelled pixel", []


def _volume_axis_on_2d(root: Path):
    return str(root / "images" / "img0.png"), ["--slice_axis", "0"]


def _volume_scribble_shape(root: Path):
    content = _datalist(root)
    vol = np.stack([_image_array(root, k) for k in range(3)])
    tifffile.imwrite(root / "images" / "vol.tif", vol)
    scribble = np.full((2, SIZE, SIZE), 255, np.uint8)
    scribble[0, 2, 2:30] = 0
    scribble[0, 20, 20:24] = 1
    tifffile.imwrite(root / "scribbles" / "vol.tif", scribble)
    content["training"] = [{"image": "images/vol.tif", "scribble": "scribbles/vol.tif"}]
    _set_datalist(root, content)
    return str(root / "scribbles" / "vol.tif"), ["--slice_axis", "0"]


def _nonfinite_mode_typo(root: Path):
    return "nonfinite_pixels", ["--nonfinite_pixels", "zero"]


def _pretrained_missing(root: Path):
    return str(root / "models" / "model.pt"), ["--pretrained_weights", str(root / "models" / "model.pt")]


def _pretrained_other_network(root: Path):
    shipped = Path(__file__).resolve().parents[1] / "bundle" / "models" / "model.pt"
    return f"{shipped} does not fit this network: other shapes", [
        "--pretrained_weights", str(shipped), "--network_def#channels", "[8,16,32,64]"]


@dataclass(frozen=True)
class Case:
    """One malformed input: its name, what it breaks, and the function that breaks a fresh dataset."""

    name: str
    description: str
    make: Callable[[Path], tuple[str, list[str]]]


TRAINING_CASES: list[Case] = [
    Case("image_nan_patch", "float TIFF image with a NaN patch", _nan_patch),
    Case("image_all_nan", "float TIFF image, every pixel NaN", _all_nan),
    Case("image_inf", "float TIFF image with +inf and -inf pixels", _inf_pixels),
    Case("image_empty_file", "image file of 0 bytes", _empty_image),
    Case("image_truncated", "PNG cut after 60 bytes", _truncated_png),
    Case("image_text", "a text file named .png", _text_as_png),
    Case("image_1x1", "a 1x1 image (and scribble)", _one_pixel_image),
    Case("image_7_channels", "an HxWx7 TIFF", _seven_channels),
    Case("scribble_shape", "scribble 64x69 for a 64x64 image", _scribble_other_shape),
    Case("scribble_value_7", "scribble holding the undeclared value 7", _scribble_value_7),
    Case("scribble_value_2", "scribble holding the undeclared value 2", _scribble_value_2),
    Case("scribble_rgb", "RGB scribble", _scribble_rgb),
    Case("scribble_empty_file", "scribble file of 0 bytes", _scribble_empty_file),
    Case("scribble_nan_tiff", "float TIFF scribble with a NaN", _scribble_nan_tiff),
    Case("scribble_jpeg", "scribble saved as lossy JPEG", _scribble_jpeg),
    Case("missing_image", "listed image does not exist", _missing_image),
    Case("missing_scribble", "listed scribble does not exist", _missing_scribble),
    Case("label_shape", "label of another shape", _label_other_shape),
    Case("datalist_malformed", "datalist.json is not valid JSON", _malformed_json),
    Case("datalist_list", "datalist.json is a list, not an object", _datalist_is_a_list),
    Case("training_not_list", "'training' is an object, not a list", _training_not_a_list),
    Case("item_string", "a training item is a string", _item_not_an_object),
    Case("item_no_scribble", "a training item has no 'scribble'", _item_without_scribble),
    Case("path_number", "a scribble path that is a number", _path_not_a_string),
    Case("training_empty", "an empty training list", _empty_training_list),
    Case("duplicate_items", "the same image listed twice", _duplicate_items),
    Case("dataset_dir_typo", "--dataset_dir names a folder that does not exist", _dataset_dir_typo),
    Case("no_datalist", "a data folder without datalist.json", _folder_without_datalist),
    Case("no_foreground", "no scribble holds a foreground stroke", _no_foreground),
    Case("no_background", "no scribble holds a background stroke", _no_background),
    Case("no_scribble", "every scribble is empty", _no_scribble_at_all),
    Case("volume_axis_2d", "--slice_axis 0 on 2D PNG images", _volume_axis_on_2d),
    Case("volume_scribble_shape", "volume scribble with 2 slices for a 3-slice volume", _volume_scribble_shape),
    Case("nonfinite_key_typo", "--nonfinite_pixels with an unknown mode", _nonfinite_mode_typo),
    Case("pretrained_missing", "--pretrained_weights names a file that does not exist", _pretrained_missing),
    Case("pretrained_other_network", "--pretrained_weights of another network", _pretrained_other_network),
]


def snapshot(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root`` (to show that a run changed none)."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def run_training(dataset_dir: Path, work: Path, *overrides: str, env: dict | None = None, timeout: int = 600):
    """``python -m monai.bundle run training`` on ``dataset_dir`` with outputs under ``work``; the finished process."""
    options = {
        "--bundle_root": str(work), "--dataset_dir": str(dataset_dir), "--num_workers": "0", "--roi_size": "[64,64]",
        "--batch_size": "4", "--max_steps": "2", "--num_figures": "0",
    }
    options.update(dict(zip(overrides[::2], overrides[1::2])))  # later options win
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.json"]
    cmd += [x for pair in options.items() for x in pair]
    full_env = {k: v for k, v in os.environ.items() if k != "S2L_DEBUG"}
    full_env.update({"PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **(env or {})})
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, env=full_env, timeout=timeout)


def error_text(proc: subprocess.CompletedProcess) -> str:
    """The user-facing error of a failed run (from ``error:`` on), or ``""``."""
    text = proc.stderr
    return text[text.index("error: "):] if "error: " in text else ""
