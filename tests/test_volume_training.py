"""3D end to end: `python -m monai.bundle run training --slice_axis 0` on a tiny scribbled TIFF volume, then
slice-wise inference and evaluation through configs/inference.json + configs/evaluate.json, in subprocesses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from s2l_testing import run_bundle

from s2l_monai.data.datalist import item_id
from s2l_monai.data.scribbles import auto_scribbles
from s2l_monai.data.synthetic import synthetic_nuclei
from s2l_monai.ensemble import EMAStore
from s2l_monai.volumes import Volume, VolumeGeometry, write_volume

REPO = Path(__file__).resolve().parents[1]
SCRIBBLED = (1, 4, 6)
SHAPE = (8, 64, 64)

pytestmark = pytest.mark.slow


def make_volume_dataset(root: Path, shape: tuple[int, int, int] = SHAPE, scribbled: tuple[int, ...] = SCRIBBLED,
                        name: str = "vol") -> Path:
    """A ZYX uint8 TIFF volume of synthetic nuclei, its label volume and scribbles on ``scribbled`` slices only."""
    image = np.zeros(shape, np.uint8)
    labels = np.zeros(shape, np.uint16)
    for k in range(shape[0]):
        image[k], labels[k] = synthetic_nuclei(shape[1:], seed=k, n_nuclei=(3, 6))
    scribble = np.full(shape, 255, np.uint8)
    for k in scribbled:
        scribble[k] = auto_scribbles(labels[k], 0.5, seed=k)
    geometry = VolumeGeometry(shape=shape, spacing=(0.05, 0.004, 0.004), unit="micron")
    for sub, arr in (("images", image), ("scribbles", scribble), ("labels", (labels > 0).astype(np.uint8) * 255)):
        write_volume(root / sub / f"{name}.tif", arr, geometry)
    item = {"image": f"images/{name}.tif", "scribble": f"scribbles/{name}.tif", "label": f"labels/{name}.tif"}
    (root / "datalist.json").write_text(json.dumps({"training": [item], "validation": [item], "test": [item]}))
    return root


@pytest.fixture(scope="module")
def trained_3d(tmp_path_factory):
    root = tmp_path_factory.mktemp("vol3d")
    make_volume_dataset(root / "data")
    proc = run_bundle(
        "training", "configs/train.json",
        "--dataset_dir", str(root / "data"), "--output_dir", str(root / "out"), "--ckpt_dir", str(root / "models"),
        "--slice_axis", "0", "--max_epochs", "2", "--warmup_epochs", "1", "--ema_every", "1", "--num_workers", "0",
        "--roi_size", "[64,64]", "--infer_roi_size", "[64,64]", "--batch_size", "4", "--num_samples", "2",
    )
    return root, proc


def test_3d_training_trains_scribbled_slices_and_fills_one_ema_volume(trained_3d):
    root, proc = trained_3d
    log = proc.stdout + proc.stderr
    assert "s2l - INFO - epoch 2/2" in log, log[-3000:]
    ckpt = torch.load(root / "models" / "checkpoint_final.pt", map_location="cpu", weights_only=False)
    # one training item per scribbled slice: 3 items, 1 batch of 4 patches... epoch_length = ceil(3 / (4 // 2))
    assert ckpt["trainer"]["epoch_length"] == 2
    items = ckpt["ema_store"]["items"]
    vol_id = item_id("images/vol.tif")
    assert list(items) == [vol_id]
    ema = items[vol_id].numpy()
    assert ema.shape == (1, *SHAPE) and ema.dtype == np.float16
    ensembled = [k for k in range(SHAPE[0]) if not np.isnan(ema[0, k]).any()]
    assert ensembled == list(SCRIBBLED)  # the ensemble covers exactly the slices trained on
    store = EMAStore(root / "out" / "ema")
    prob = store.probabilities(vol_id, slice_index=4)
    assert prob.shape == (2, 64, 64) and np.allclose(prob.sum(0), 1.0, atol=1e-3)
    assert store.probabilities(vol_id, slice_index=0) is None
    figures = sorted(p.name for p in (root / "out" / "pseudo_labels").glob("*.png"))
    assert f"{vol_id}_z0001_epoch0002.png" in figures


def test_3d_inference_and_evaluation_keep_the_input_geometry(trained_3d, tmp_path):
    root, _ = trained_3d
    ckpt = str(root / "models" / "model.pt")
    run_bundle(
        "inference", "configs/inference.json", "--slice_axis", "0", "--input_dir", str(root / "data" / "images"),
        "--ckpt_path", ckpt, "--output_dir", str(tmp_path / "infer"), "--infer_roi_size", "[64,64]",
        "--save_probabilities", "true", "--instance_mode", "3d", "--min_size", "4",
    )
    src = Volume(root / "data" / "images" / "vol.tif")
    for kind, dtype in (("semantic", np.uint8), ("instances", np.uint32), ("prob", np.float32)):
        out = Volume(tmp_path / "infer" / f"vol_{kind}.tif")
        assert out.shape == SHAPE and out.dtype == dtype, kind
        np.testing.assert_allclose(out.geometry.spacing, src.geometry.spacing, rtol=1e-6)
        assert out.geometry.unit == "micron"
    semantic = Volume(tmp_path / "infer" / "vol_semantic.tif").read()
    prob = Volume(tmp_path / "infer" / "vol_prob.tif").read()
    # the semantic mask is the probability read at the threshold the training calibrated on its slices
    threshold = json.loads((root / "models" / "model.calibration.json").read_text())["foreground_threshold"]
    np.testing.assert_array_equal(semantic, (prob > threshold).astype(np.uint8))
    inst = np.asarray(Volume(tmp_path / "infer" / "vol_instances.tif").read())
    assert set(np.unique(inst).tolist()) == set(range(int(inst.max()) + 1))  # 3D components, ids 1..N

    out = tmp_path / "eval"
    run_bundle(
        "evaluating", "['configs/inference.json','configs/evaluate.json']", "--slice_axis", "0",
        "--dataset_dir", str(root / "data"), "--ckpt_path", ckpt, "--output_dir", str(out),
        "--infer_roi_size", "[64,64]",
    )
    per_slice = (out / "metrics.csv").read_text().splitlines()
    assert len(per_slice) == 1 + SHAPE[0] and per_slice[1].startswith("vol_z0000")
    summary_3d = json.loads((out / "volume_3d" / "summary.json").read_text())
    assert summary_3d["n_images"] == 1 and 0.0 <= summary_3d["iou"] <= 1.0
    assert (out / "predictions" / "vol_instances.tif").is_file()
