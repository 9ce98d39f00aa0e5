"""Evaluation: the merged inference + evaluate bundle, ``s2l evaluate`` on files, the ``s2l otsu`` baseline."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor
from PIL import Image
from s2l_testing import default_network

from s2l_monai.cli import main
from s2l_monai.data.synthetic import make_synthetic_dataset
from s2l_monai.evaluation import InstanceMetricsHandler, evaluate_folders, gt_instances, otsu_foreground

REPO = Path(__file__).resolve().parents[1]
SUMMARY_KEYS = {
    "n_images", "n_nuclei", "iou", "mdice", "mdice_per_image", "mdice_paper", "dsb", "f1_50", "pq", "sq", "rq", "aji",
}
PERFECT_KEYS = ("iou", "mdice", "mdice_per_image", "dsb", "f1_50", "pq", "sq", "rq", "aji")


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


# ---------------------------------------------------------------------------------------------------------------------
# Units
# ---------------------------------------------------------------------------------------------------------------------


def test_gt_instances_keeps_instance_maps_and_splits_binary_masks():
    inst = np.zeros((8, 8), dtype=np.uint16)
    inst[1:3, 1:3], inst[5:7, 5:7] = 4, 9
    np.testing.assert_array_equal(gt_instances(inst), inst)
    binary = (inst > 0).astype(np.uint8) * 255
    labels = gt_instances(binary)
    assert labels.max() == 2 and np.array_equal(labels > 0, inst > 0)


def test_otsu_foreground_picks_the_smaller_side():
    img = np.full((40, 40), 0.8)
    img[5:15, 5:15] = 0.1  # dark nucleus on bright background (bright-field)
    assert otsu_foreground(img).sum() == 100 and otsu_foreground(img)[10, 10]
    assert otsu_foreground(1.0 - img)[10, 10] and otsu_foreground(1.0 - img).sum() == 100  # fluorescence
    assert not otsu_foreground(np.ones((5, 5))).any()


def test_instance_metrics_handler_on_an_ignite_engine(tmp_path):
    gt = np.zeros((1, 20, 24), dtype=np.int32)
    gt[0, 2:8, 2:8], gt[0, 10:18, 12:20] = 1, 2

    def item(name: str) -> dict:
        image = MetaTensor(torch.zeros(1, 20, 24), meta={"filename_or_obj": f"/x/{name}.png"})
        return {"image": image, "pred": torch.as_tensor(gt > 0), "instances": torch.as_tensor(gt), "label": gt}

    engine = Engine(lambda e, batch: [item(n) for n in batch])
    handler = InstanceMetricsHandler(tmp_path)
    handler.attach(engine)
    engine.run([["a", "b"], ["c"]], max_epochs=1)
    assert [r["name"] for r in handler.records] == ["a", "b", "c"]
    assert engine.state.metrics["n_images"] == 3 and engine.state.metrics["pq"] == 1.0
    assert len(_rows(tmp_path / "metrics.csv")) == 3
    assert json.loads((tmp_path / "summary.json").read_text())["aji"] == 1.0


def test_s2l_evaluate_perfect_prediction_scores_one(tmp_path, capsys):
    root = tmp_path / "data"
    make_synthetic_dataset(root, n_train=0, n_val=0, n_test=2, shape=(48, 40))
    pred, gt_binary = tmp_path / "pred", tmp_path / "gt_binary"
    pred.mkdir()
    gt_binary.mkdir()
    for label in sorted((root / "labels").glob("*.png")):
        shutil.copy(label, pred / f"{label.stem}_instances.png")
    assert main(["evaluate", "--pred", str(pred), "--gt", str(root / "labels"), "--out", str(tmp_path / "rep")]) == 0
    assert "Evaluation summary (2 images" in capsys.readouterr().out
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert set(summary) == SUMMARY_KEYS
    assert all(summary[k] == pytest.approx(1.0) for k in PERFECT_KEYS), summary
    rows = _rows(tmp_path / "rep" / "metrics.csv")
    assert [r["name"] for r in rows] == ["synth_000", "synth_001"]

    # a binary ground truth against the same prediction: only the touching nuclei can differ, IoU stays 1
    for label in sorted((root / "labels").glob("*.png")):
        arr = np.asarray(Image.open(label))
        Image.fromarray(((arr > 0) * 255).astype(np.uint8)).save(gt_binary / label.name)
    records = evaluate_folders(pred, gt_binary)
    assert all(r["iou"] == pytest.approx(1.0) for r in records)

    # missing predictions: warned and skipped, or an error with --require-all
    (pred / "synth_001_instances.png").unlink()
    assert [r["name"] for r in evaluate_folders(pred, root / "labels")] == ["synth_000"]
    assert main(["evaluate", "--pred", str(pred), "--gt", str(root / "labels"), "--require-all"]) == 2


def test_s2l_otsu_baseline_on_synthetic_set(tmp_path):
    make_synthetic_dataset(tmp_path / "data", n_train=0, n_val=0, n_test=2, shape=(256, 256))
    out = tmp_path / "otsu"
    argv = ["otsu", "--datalist", str(tmp_path / "data" / "datalist.json"), "--split", "test", "--out", str(out)]
    assert main([*argv, "--save-predictions"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_images"] == 2 and 0.6 < summary["iou"] < 0.95, summary
    assert 0.3 < summary["mdice"] < 0.95, summary
    assert len(_rows(out / "metrics.csv")) == 2
    instances = np.asarray(Image.open(out / "synth_000_instances.png"))
    assert instances.shape == (256, 256) and instances.dtype == np.uint16


# ---------------------------------------------------------------------------------------------------------------------
# The merged bundle, end to end
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_evaluate_bundle_merged_with_inference_config(tmp_path):
    torch.manual_seed(0)
    net = default_network()
    (tmp_path / "models").mkdir()
    torch.save(net.state_dict(), tmp_path / "models" / "model.pt")
    # a calibrated foreground threshold beside the weights (configs/evaluate.json must import its module too)
    (tmp_path / "models" / "model.calibration.json").write_text('{"foreground_threshold": 0.45}')
    make_synthetic_dataset(tmp_path / "data", n_train=2, n_val=1, n_test=2, shape=(96, 80))
    out = tmp_path / "eval"
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "evaluating",
        "--config_file", "['configs/inference.json','configs/evaluate.json']",
        "--ckpt_path", str(tmp_path / "models" / "model.pt"), "--dataset_dir", str(tmp_path / "data"),
        "--output_dir", str(out),
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "Metrics -- " in proc.stdout + proc.stderr and " iou: " in proc.stdout + proc.stderr
    assert "foreground threshold 0.45, calibrated after training" in proc.stdout + proc.stderr

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == SUMMARY_KEYS and summary["n_images"] == 2
    assert 0.0 <= summary["iou"] <= 1.0
    rows = _rows(out / "metrics.csv")
    assert [r["name"] for r in rows] == ["synth_003", "synth_004"]  # the test split only
    assert (out / "summary.md").is_file()
    predictions = sorted(p.name for p in (out / "predictions").iterdir())
    assert predictions == [f"synth_00{i}_{k}.png" for i in (3, 4) for k in ("instances", "semantic")]

    # s2l evaluate on the written predictions reproduces the bundle's numbers
    assert main(["evaluate", "--pred", str(out / "predictions"), "--gt", str(tmp_path / "data" / "labels"),
                 "--out", str(tmp_path / "again")]) == 0
    assert _rows(tmp_path / "again" / "metrics.csv") == rows
