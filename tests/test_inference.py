"""configs/inference.json run for real (``python -m monai.bundle run inference``) on a random-weight UNet.

Nothing is trained: the checks are about plumbing (one output per input, shapes not transposed, dtypes, instances
consistent with the semantic mask) and that the written mask is exactly the network's argmax on the preprocessed
image.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from monai.bundle import ConfigParser
from monai.networks.nets import UNet
from PIL import Image
from s2l_testing import default_network
from scipy import ndimage as ndi

from s2l_monai.data.synthetic import synthetic_nuclei
from s2l_monai.inference_io import SaveArrayd, as_bool, image_stem, list_images, write_array

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "inference.json"


def _random_model(path: Path, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    net = default_network()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return net


def _run_bundle(run_id: str, config: str, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config, *overrides]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _read(path: Path) -> np.ndarray:
    if path.suffix == ".tif":
        return tifffile.imread(path)
    with Image.open(path) as im:
        return np.asarray(im)


# ---------------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------------


def test_network_and_preprocessing_match_training_config():
    train = json.loads((REPO / "configs" / "train.json").read_text())
    infer = json.loads(CONFIG.read_text())
    assert infer["network_def"] == train["network_def"]
    for key in ("in_channels", "num_classes", "image_reader", "infer_roi_size"):
        assert infer[key] == train[key], key

    def image_part(transforms):
        out = []
        for t in transforms:
            keys = t["keys"] if isinstance(t["keys"], list) else [t["keys"]]
            if "image" in keys:
                out.append({k: v for k, v in t.items() if k != "keys"})
        return out

    assert image_part(infer["load_transforms"]) == image_part(train["load_transforms"])


# ---------------------------------------------------------------------------------------------------------------------
# Writer and input listing (no network)
# ---------------------------------------------------------------------------------------------------------------------


def test_save_arrayd_keeps_numpy_orientation_and_dtype(tmp_path):
    from monai.data import MetaTensor

    sem = np.zeros((1, 6, 4), dtype=np.uint8)
    sem[0, 0, :] = 1  # first row
    inst = np.zeros((1, 6, 4), dtype=np.int32)
    inst[0, :, 0] = 300  # first column, beyond uint8
    meta = {"filename_or_obj": str(tmp_path / "in" / "img.v2.png")}
    data = {"image": MetaTensor(torch.zeros(1, 6, 4), meta=meta), "pred": torch.as_tensor(sem), "inst": inst}
    SaveArrayd("pred", tmp_path / "out", "_semantic", ".png", np.uint8, scale=255)(data)
    SaveArrayd("inst", tmp_path / "out", "_instances", ".png", np.uint16)(data)
    SaveArrayd("inst", tmp_path / "out", "_instances", ".tif", np.uint16)(data)
    got = _read(tmp_path / "out" / "img.v2_semantic.png")
    assert got.shape == (6, 4) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, sem[0] * 255)
    for ext in (".png", ".tif"):
        got = _read(tmp_path / "out" / f"img.v2_instances{ext}")
        assert got.dtype == np.uint16
        np.testing.assert_array_equal(got, inst[0])
    with pytest.raises(ValueError, match="beyond uint8"):
        SaveArrayd("inst", tmp_path / "out", "_x", ".png", np.uint8)(data)
    with pytest.raises(ValueError, match="extension"):
        SaveArrayd("inst", tmp_path / "out", "_x", ".jpg")
    with pytest.raises(ValueError, match="PNG holds"):
        write_array(tmp_path / "f.png", np.zeros((2, 2), np.float32))


def test_as_bool_reads_command_line_strings():
    assert as_bool("true") and as_bool("True") and as_bool(True) and as_bool(1) and as_bool("yes")
    assert not (as_bool("false") or as_bool("False") or as_bool(False) or as_bool(0) or as_bool("0"))
    with pytest.raises(ValueError):
        as_bool("maybe")


def test_list_images_sorted_and_rejects_shared_base_names(tmp_path):
    for name in ("b.png", "a.TIF", "c.jpg", "notes.txt", ".hidden.png"):
        (tmp_path / name).write_bytes(b"")
    items = list_images(tmp_path)
    assert [i["id"] for i in items] == ["a", "b", "c"]
    assert all(Path(i["image"]).is_absolute() for i in items)
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(ValueError, match="share the base name"):
        list_images(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        list_images(tmp_path / "empty")
    with pytest.raises(ValueError, match="folder does not exist"):
        list_images(tmp_path / "absent")
    assert image_stem("/d/x.ome.tiff") == "x" and image_stem("y.v2.png") == "y.v2"


# ---------------------------------------------------------------------------------------------------------------------
# The bundle, end to end
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path, dict[str, tuple[int, int]]]:
    """A random-weight model and a folder with a 96x80 grey image, a 70x53 grey image and a 64x72 RGB image."""
    root = tmp_path_factory.mktemp("infer")
    _random_model(root / "models" / "model.pt")
    images = root / "images"
    images.mkdir()
    grey, _ = synthetic_nuclei((96, 80), seed=1)
    odd, _ = synthetic_nuclei((70, 53), seed=2)
    rgb, _ = synthetic_nuclei((64, 72), seed=3)
    Image.fromarray(grey).save(images / "a.png")
    Image.fromarray(odd).save(images / "odd.png")
    Image.fromarray(np.stack([rgb, rgb // 2, rgb // 3], axis=-1)).save(images / "rgb.png")
    shapes = {"a": (96, 80), "odd": (70, 53), "rgb": (64, 72)}
    return root, images, shapes


@pytest.fixture(scope="module")
def png_run(inputs) -> Path:
    """PNG outputs with probabilities; ROI = the 96x80 image, so that image is one window (exact comparison)."""
    root, images, _ = inputs
    out = root / "out_png"
    _run_bundle(
        "inference", "configs/inference.json",
        "--ckpt_path", str(root / "models" / "model.pt"), "--input_dir", str(images), "--output_dir", str(out),
        "--save_probabilities", "true", "--infer_roi_size", "[96,80]",
    )
    return out


def _check_consistent(semantic: np.ndarray, instances: np.ndarray, min_size: int = 64) -> None:
    """Instances lie on the semantic foreground (or its filled holes); every big foreground object has one."""
    assert set(np.unique(semantic)) <= {0, 1}
    filled = ndi.binary_fill_holes(semantic > 0)
    assert not np.any((instances > 0) & ~filled)
    components, n = ndi.label(semantic > 0, structure=np.ones((3, 3)))
    sizes = np.bincount(components.ravel(), minlength=n + 1)
    for index in np.flatnonzero(sizes >= min_size):
        if index:
            assert np.any(instances[components == index] > 0)


@pytest.mark.slow
def test_inference_png_outputs(inputs, png_run):
    _, images, shapes = inputs
    written = sorted(p.name for p in png_run.iterdir())
    expected = sorted(f"{n}_{k}" for n in shapes for k in ("semantic.png", "instances.png", "prob.tif"))
    assert written == expected
    for name, shape in shapes.items():
        semantic = _read(png_run / f"{name}_semantic.png")
        instances = _read(png_run / f"{name}_instances.png")
        prob = _read(png_run / f"{name}_prob.tif")
        assert semantic.shape == instances.shape == prob.shape == shape, name  # not transposed
        assert semantic.dtype == np.uint8 and instances.dtype == np.uint16 and prob.dtype == np.float32
        _check_consistent(semantic, instances)
        assert 0.0 <= prob.min() and prob.max() <= 1.0
        agree = (prob > 0.5) == (semantic == 1)
        assert np.all(agree | (np.abs(prob - 0.5) < 1e-4))


@pytest.mark.slow
def test_written_semantic_is_argmax_of_network_on_preprocessed_image(inputs, png_run):
    root, images, _ = inputs
    parser = ConfigParser()
    parser.read_config(str(CONFIG))
    preprocessing = parser.get_parsed_content("preprocessing")
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(root / "models" / "model.pt", map_location="cpu"))
    net.eval()
    image = preprocessing({"image": str(images / "a.png")})["image"]
    assert tuple(image.shape) == (1, 96, 80)
    x = image[None].as_tensor()
    with torch.no_grad():  # the default inference averages the logits over the four flips (test_time_flips)
        logits = sum(net(x.flip(d)).flip(d) if d else net(x) for d in ((), (2,), (3,), (2, 3))) / 4
        prob = torch.softmax(logits, dim=1)[0].numpy()
    expected = np.argmax(prob, axis=0).astype(np.uint8)
    semantic = _read(png_run / "a_semantic.png")
    differ = semantic != expected
    assert np.all(np.abs(prob[1] - prob[0])[differ] < 1e-4), f"{differ.sum()} pixels differ"
    assert 0 < expected.mean() < 1  # both classes present, so orientation is actually tested
    np.testing.assert_allclose(_read(png_run / "a_prob.tif"), prob[1], atol=1e-4)


@pytest.mark.slow
def test_inference_reads_the_calibrated_threshold(inputs, png_run, tmp_path):
    """A ``model.calibration.json`` beside the weights (written after training) sets the foreground threshold of the
    semantic masks and the instances; ``--foreground_threshold`` overrides it."""
    root, images, _ = inputs
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(root / "models" / "model.pt", models / "model.pt")
    prob = _read(png_run / "a_prob.tif")
    t = float(np.quantile(prob, 0.3))  # a threshold that moves many pixels of this random model
    (models / "model.calibration.json").write_text(json.dumps({"foreground_threshold": t}))
    for name, extra in (("auto", []), ("given", ["--foreground_threshold", "0.5"])):
        out = tmp_path / name
        proc = _run_bundle("inference", "configs/inference.json", "--ckpt_path", str(models / "model.pt"),
                           "--input_dir", str(images), "--output_dir", str(out), "--save_probabilities", "true",
                           "--infer_roi_size", "[96,80]", *extra)
        semantic = _read(out / "a_semantic.png")
        np.testing.assert_allclose(_read(out / "a_prob.tif"), prob, atol=1e-6)
        expected = prob > (t if name == "auto" else 0.5)
        assert np.mean(semantic == expected) > 0.999, name
        _check_consistent(semantic, _read(out / "a_instances.png"))
        if name == "auto":
            assert f"foreground threshold {t:.2f}, calibrated after training" in proc.stdout + proc.stderr
            assert abs((prob > t).mean() - (prob > 0.5).mean()) > 0.1  # the threshold moved many pixels


@pytest.mark.slow
def test_inference_tif_outputs_default_roi_and_viewable_scale(inputs):
    root, images, shapes = inputs
    out = root / "out_tif"
    _run_bundle(
        "run", "configs/inference.json",
        "--ckpt_path", str(root / "models" / "model.pt"), "--input_dir", str(images), "--output_dir", str(out),
        "--output_ext", ".tif", "--semantic_scale", "255", "--instance_method", "connected",
        "--save_probabilities", "false",  # fire passes the string "false"
    )
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{n}_{k}" for n in shapes for k in ("semantic.tif", "instances.tif")
    )
    for name, shape in shapes.items():
        semantic = tifffile.imread(out / f"{name}_semantic.tif")
        instances = tifffile.imread(out / f"{name}_instances.tif")
        assert semantic.shape == instances.shape == shape
        assert semantic.dtype == np.uint8 and instances.dtype == np.uint16
        assert set(np.unique(semantic)) <= {0, 255}
        _check_consistent(semantic // 255, instances)
