"""Real ``python -m monai.bundle run`` of configs/train.json in a subprocess, and resuming from its checkpoint."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from s2l_testing import default_network, run_bundle

from s2l_monai.data.datalist import item_id
from s2l_monai.data.synthetic import make_synthetic_dataset
from s2l_monai.ensemble import EMAStore
from s2l_monai.uncertainty import read_map

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(*overrides: str):
    return run_bundle("training", "configs/train.json", *overrides)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    make_synthetic_dataset(root / "data", n_train=4, n_val=1, n_test=1, shape=(96, 96), seed=3)
    common = [
        "--dataset_dir", str(root / "data"), "--output_dir", str(root / "out"), "--ckpt_dir", str(root / "models"),
        "--warmup_epochs", "1", "--ema_every", "2", "--num_workers", "0", "--roi_size", "[64,64]",
        "--infer_roi_size", "[64,64]", "--batch_size", "4", "--num_samples", "2",
    ]
    proc = _run(*common, "--max_epochs", "2")
    return root, common, proc


def test_training_run_writes_checkpoint_with_ema_store(trained):
    root, _, proc = trained
    log = proc.stdout + proc.stderr
    assert re.search(r"s2l - INFO - epoch 2/2 in [\d.]+ s, step \d+/\d+: loss .*last ensemble", log), log[-3000:]
    assert "Key metric" not in log and "Epoch[2] Complete" not in log  # one line per epoch
    assert "training finished after" in log and "model.pt" in log
    # the run ends with the labelled test split, model beside Otsu, and a picture
    m = re.search(r"test split \(1 images with full masks\): this model IoU ([\d.]+), DSB score [\d.]+; Otsu "
                  r"threshold IoU ([\d.]+)", log)
    assert m, log[-3000:]
    report = json.loads((root / "out" / "test_evaluation" / "comparison.json").read_text())
    assert report["model"]["iou"] == pytest.approx(float(m.group(1)), abs=5e-4)
    assert report["otsu"]["iou"] == pytest.approx(float(m.group(2)), abs=5e-4)
    figure = np.asarray(Image.open(root / "out" / "test_evaluation" / "comparison.png"))
    assert figure.shape == (96, 4 * 96 + 3 * 4, 3)
    assert (root / "models" / "model.pt").is_file()
    # the foreground threshold after training: these crowded images (nuclei fill ~70%) are read at the argmax, and
    # the record says why; the test evaluation reads it
    calibration = json.loads((root / "models" / "model.calibration.json").read_text())
    assert calibration["foreground_threshold"] == 0.5 and "not objects on a background" in calibration["not_calibrated"]
    assert "foreground threshold 0.50: the scribbles put about" in log
    assert "foreground threshold 0.50, calibrated after training" in log
    ckpt = torch.load(root / "models" / "checkpoint_final.pt", map_location="cpu", weights_only=False)
    assert set(ckpt) >= {"network", "optimizer", "lr_scheduler", "ema_store", "trainer"}
    assert ckpt["trainer"]["iteration"] == 2 * ckpt["trainer"]["epoch_length"]
    assert sorted(ckpt["ema_store"]["items"]) == sorted(item_id(f"images/synth_00{i}.png") for i in range(4))
    assert all(v.shape == (1, 96, 96) for v in ckpt["ema_store"]["items"].values())
    figures = sorted((root / "out" / "pseudo_labels").glob("*.png"))
    assert len(figures) == 4 and all(f.name.endswith("_epoch0002.png") for f in figures)
    assert list((root / "out" / "tensorboard").glob("events.out.tfevents.*"))
    # the ensemble's uncertainty maps and their summary, and `s2l suggest` on the run's folder
    summary = json.loads((root / "out" / "uncertainty" / "uncertainty.json").read_text())
    assert summary["epoch"] == 2 and len(summary["items"]) == 4
    assert all(Path(e["image"]).is_file() and read_map(root / "out" / "uncertainty", e).shape == (96, 96)
               for e in summary["items"])
    suggest = subprocess.run([sys.executable, "-m", "s2l_monai", "suggest", "--run", str(root / "out"), "--top", "2"],
                             capture_output=True, text=True, timeout=120)
    assert suggest.returncode == 0 and "2 image(s) to scribble next" in suggest.stdout, suggest.stderr
    assert len(list((root / "out" / "suggestions").glob("0[12]_synth_*.png"))) == 2
    # images without scribbles (the validation and test images of the folder) ranked with them, from the model's flips
    cmd = [sys.executable, "-m", "s2l_monai", "suggest", "--run", str(root / "out"), "--top", "6", "--candidates",
           str(root / "data" / "images"), "--ckpt", str(root / "models" / "model.pt"), "--out", str(root / "all")]
    suggest = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert suggest.returncode == 0, suggest.stderr
    ranked = json.loads((root / "all" / "suggestions.json").read_text())["suggestions"]
    assert len(ranked) == 6 and sum(bool(s.get("source")) for s in ranked) == 2  # 4 scribbled + 2 candidates
    assert suggest.stdout.count("(no scribbles yet)") == 2
    for s in ranked:
        u = np.asarray(read_map(root / "out" / "uncertainty", s))
        assert u.shape == (96, 96) and u.dtype == np.uint8
        uncertain = float((u >= 0.4 * 255 - 0.5).sum())
        assert s["uncertain_share"] == pytest.approx(uncertain / s["unlabelled_pixels"], abs=0.02)
    # the network weights alone, loadable into the configured network


    net = default_network()
    net.load_state_dict(torch.load(root / "models" / "model.pt", map_location="cpu"))


def test_resume_restores_ema_store_and_epoch(trained):
    root, common, _ = trained
    saved = torch.load(root / "models" / "checkpoint_final.pt", map_location="cpu", weights_only=False)
    shutil.rmtree(root / "out" / "ema")  # lose the store: only the checkpoint can bring it back
    ckpt = shutil.copy(root / "models" / "checkpoint_final.pt", root / "resume.pt")
    proc = _run(*common, "--max_epochs", "3", "--resume_from", str(ckpt))
    log = proc.stdout + proc.stderr
    assert "s2l - INFO - epoch 3/3" in log and "epoch 1/" not in log, log[-3000:]
    # epoch 3 runs no ensemble (every 2), so the store holds exactly what the checkpoint held
    store = EMAStore(root / "out" / "ema", num_classes=2)
    assert store.ids() == sorted(saved["ema_store"]["items"])
    for key, value in saved["ema_store"]["items"].items():
        np.testing.assert_array_equal(np.load(store.path(key)), value.numpy())
    resumed = torch.load(root / "models" / "checkpoint_final.pt", map_location="cpu", weights_only=False)
    assert resumed["trainer"]["iteration"] == 3 * resumed["trainer"]["epoch_length"]


def test_time_budget_ends_the_run_and_saves(trained):
    """``--max_train_seconds``: a schedule of 100000 steps ends when the clock runs out, mid-epoch, with a final
    checkpoint and the schedule laid on the time (warm-up and ensembles as shares of the 8 s)."""
    root, common, _ = trained
    pairs = dict(zip(common[::2], common[1::2]))
    pairs.update({"--output_dir": str(root / "out_budget"), "--ckpt_dir": str(root / "models_budget")})
    del pairs["--warmup_epochs"], pairs["--ema_every"]  # the default shares of the run
    over = [x for pair in pairs.items() for x in pair]
    proc = _run(*over, "--max_steps", "100000", "--max_train_seconds", "8")
    log = proc.stdout + proc.stderr
    m = re.search(r"time budget 8 s spent after (\d+) of 100000 steps", log)
    assert m, log[-3000:]
    assert "ensembles at 0.50, 0.60, 0.70, 0.80, 0.90" in log
    assert len(re.findall(r"EMAEnsembleHandler - INFO - .* ensemble of 4 items", log)) >= 3
    ckpt = torch.load(root / "models_budget" / "checkpoint_final.pt", map_location="cpu", weights_only=False)
    assert ckpt["trainer"]["iteration"] == int(m.group(1)) and ckpt["schedule"]["seconds"] >= 8
    assert (root / "models_budget" / "model.pt").is_file()


def test_bfloat16_training_runs_and_saves_float32_weights(trained):
    """``--precision bf16``: the run says it trains in bfloat16 autocast, the loss stays finite, ensembles run, and
    the saved weights are float32 (the optimiser's master copy), loadable by float32 inference."""
    root, common, _ = trained
    pairs = dict(zip(common[::2], common[1::2]))
    pairs.update({"--output_dir": str(root / "out_bf16"), "--ckpt_dir": str(root / "models_bf16")})
    over = [x for pair in pairs.items() for x in pair]
    proc = _run(*over, "--max_epochs", "2", "--precision", "bf16")
    log = proc.stdout + proc.stderr
    assert "training precision: bfloat16 autocast (asked for" in log, log[-3000:]
    losses = [float(v) for v in re.findall(r"step \d+/\d+: loss ([\d.eE+-]+|nan|inf)", log)]
    assert losses and all(np.isfinite(losses)), log[-3000:]
    assert re.search(r"EMAEnsembleHandler - INFO - .* ensemble of 4 items", log)
    weights = torch.load(root / "models_bf16" / "model.pt", map_location="cpu")
    assert weights and all(v.dtype == torch.float32 for v in weights.values() if v.is_floating_point())


def test_pretrained_weights_start_the_network(trained):
    """``--pretrained_weights``: the network starts from a saved ``model.pt`` (one flag for fine-tuning); with a
    learning rate of 0 the saved model is exactly the one it started from."""
    root, common, _ = trained
    pairs = dict(zip(common[::2], common[1::2]))
    pairs.update({"--output_dir": str(root / "out_pre"), "--ckpt_dir": str(root / "models_pre")})
    over = [x for pair in pairs.items() for x in pair]
    start = root / "models" / "model.pt"
    proc = _run(*over, "--max_epochs", "1", "--learning_rate", "0", "--pretrained_weights", str(start))
    assert f"Restored all variables from {start}" in proc.stdout + proc.stderr
    before = torch.load(start, map_location="cpu")
    after = torch.load(root / "models_pre" / "model.pt", map_location="cpu")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_default_starts_from_the_shipped_weights(trained, tmp_path):
    """``pretrained_weights`` "auto" (the default): on nuclei on a background the run says it starts from the shipped
    weights and does (with a learning rate of 0 the saved model is exactly them); where the scribbles say the
    foreground fills most of the image it trains from scratch and says why; ``""`` trains from scratch. (A file that
    does not fit is one short error naming it: tests/reliability_cases.py.)"""
    root, common, proc = trained
    shipped = REPO / "bundle" / "models" / "model.pt"
    # the fixture's 96x96 synthetic images are crowded: nuclei cover about 78% of them (estimated 69%)
    log = proc.stdout + proc.stderr
    share = json.loads((root / "out" / "class_prior.json").read_text())["image_foreground_share"]
    assert share > 0.5
    assert (f"pretrained_weights=auto: the scribbles put about {100 * share:.0f}% of the pixels in the foreground, "
            f"not objects on a background like the nuclei of the shipped weights {shipped}; the network starts from "
            "scratch") in log, log[-3000:]
    assert "Restored all variables" not in log
    # 160x160 images of the same generator: nuclei on a background (about 40% of the pixels)
    make_synthetic_dataset(tmp_path / "data", n_train=4, n_val=0, n_test=0, shape=(160, 160), seed=3)
    pairs = dict(zip(common[::2], common[1::2]))
    pairs.update({"--dataset_dir": str(tmp_path / "data"), "--output_dir": str(tmp_path / "out"),
                  "--ckpt_dir": str(tmp_path / "models")})
    over = [x for pair in pairs.items() for x in pair] + ["--max_epochs", "1", "--learning_rate", "0"]
    started = _run(*over)
    log = started.stdout + started.stderr
    assert f"pretrained_weights=auto: the network starts from the shipped weights {shipped}" in log, log[-3000:]
    assert f"Restored all variables from {shipped}" in log
    # nuclei on a background: the threshold is calibrated on the 4 training images
    calibration = json.loads((tmp_path / "models" / "model.calibration.json").read_text())
    assert calibration["items"] == 4 and calibration["foreground_threshold"] in calibration["thresholds"]
    assert f"foreground threshold {calibration['foreground_threshold']:.2f}: the outlines of p > t" in log
    before = torch.load(shipped, map_location="cpu")
    after = torch.load(tmp_path / "models" / "model.pt", map_location="cpu")
    assert all(torch.equal(before[k], after[k]) for k in before)
    scratch = _run(*over, "--pretrained_weights", "")
    log = scratch.stdout + scratch.stderr
    assert "pretrained_weights: none, the network starts from scratch" in log and "Restored all" not in log
    after = torch.load(tmp_path / "models" / "model.pt", map_location="cpu")
    assert not all(torch.equal(before[k], after[k]) for k in before)


def test_drift_control_weights_l_up_and_resumes_with_its_state(trained):
    """``--drift_control true``: after every ensemble past the warm-up the log names L_up's background weight,
    ``w_k = w_(k-1) * f_k / f_0`` (clipped to [1, 4]); the checkpoint keeps the reference and the weight, and a
    resumed run goes on from them instead of starting over at 1."""
    root, common, _ = trained
    pairs = dict(zip(common[::2], common[1::2]))
    pairs.update({"--output_dir": str(root / "out_drift"), "--ckpt_dir": str(root / "models_drift"),
                  "--ema_every": "1"})
    over = [x for pair in pairs.items() for x in pair] + ["--drift_control", "true"]
    pattern = re.compile(r"step (\d+): foreground ([\d.]+)% of the pseudo-labelled pixels \(reference ([\d.]+)%\), "
                         r"L_up background weight ([\d.]+)")

    def check(lines, weight, reference):
        for _, share, ref, logged in lines:
            if reference is None:  # the warm-up ensemble (epoch 1) sets the reference
                reference, expected = float(share), 1.0
            else:
                expected = min(max(weight * float(share) / reference, 1.0), 4.0)
            assert float(ref) == pytest.approx(reference, abs=0.006)
            assert float(logged) == pytest.approx(expected, abs=0.002 * expected)
            weight = float(logged)
        return weight, reference

    proc = _run(*over, "--max_epochs", "3")
    lines = pattern.findall(proc.stdout + proc.stderr)
    assert len(lines) == 3, (proc.stdout + proc.stderr)[-3000:]
    weight, reference = check(lines, 1.0, None)
    saved = torch.load(root / "models_drift" / "checkpoint_final.pt", map_location="cpu", weights_only=False)
    assert saved["drift_control"]["weight"] == pytest.approx(weight, abs=5e-4)
    assert 100 * saved["drift_control"]["reference"] == pytest.approx(reference, abs=0.006)
    ckpt = shutil.copy(root / "models_drift" / "checkpoint_final.pt", root / "resume_drift.pt")
    proc = _run(*over, "--max_epochs", "4", "--resume_from", str(ckpt))
    lines = pattern.findall(proc.stdout + proc.stderr)
    assert len(lines) == 1, (proc.stdout + proc.stderr)[-3000:]
    check(lines, saved["drift_control"]["weight"], 100 * saved["drift_control"]["reference"])
