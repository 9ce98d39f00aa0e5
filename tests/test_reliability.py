"""Reliability (issue 15): the malformed-input corpus, numerical guards, EMA ids, inference past bad files,
exact resume after kill -9 at seeded points. Every run is a real ``python -m monai.bundle run`` subprocess."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from reliability_cases import TRAINING_CASES, error_text, run_training, snapshot, write_dataset

from s2l_monai.faults import FAULT_ENV


@pytest.mark.parametrize("case", TRAINING_CASES, ids=[c.name for c in TRAINING_CASES])
def test_malformed_training_input_is_one_short_error_naming_the_file(case, tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "data")
    expected, overrides = case.make(root)
    before = snapshot(root)
    proc = run_training(root, tmp_path / "run", *overrides)
    message = error_text(proc)
    assert proc.returncode != 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert expected in message, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert len(message.splitlines()) <= 12, message
    assert snapshot(root) == before  # no input file changed
    assert not (tmp_path / "run" / "models" / "model.pt").exists()


def test_corpus_is_large_enough() -> None:
    assert len(TRAINING_CASES) >= 30
    assert len({c.name for c in TRAINING_CASES}) == len(TRAINING_CASES)


def test_debug_env_keeps_the_traceback(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "data")
    (root / "images" / "img0.png").write_bytes(b"")
    proc = run_training(root, tmp_path / "run", env={"S2L_DEBUG": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_unscribbled_images_are_left_out_with_a_warning(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "data", n=4)
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(root / "scribbles" / "img2.png")
    proc = run_training(root, tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "1 of 4 training image(s) have no scribbled pixel and are left out of training" in log
    assert "img2.png" in log
    store = sorted(p.name for p in (tmp_path / "run" / "runs" / "train" / "ema").glob("*.npy"))
    assert len(store) == 3 and not any(name.startswith("img2") for name in store)


def test_nonfinite_pixels_can_be_replaced_explicitly(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "data")
    content = json.loads((root / "datalist.json").read_text())
    a = np.asarray(Image.open(root / "images" / "img0.png")).astype(np.float32)
    a[5:9, 5:9] = np.nan
    tifffile.imwrite(root / "images" / "img0.tif", a)
    content["training"][0]["image"] = "images/img0.tif"
    (root / "datalist.json").write_text(json.dumps(content))
    proc = run_training(root, tmp_path / "run", "--nonfinite_pixels", "replace")
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "16 pixel(s) are NaN or infinite" in log and "replaced" in log
    weights = torch.load(tmp_path / "run" / "models" / "model.pt", weights_only=True)
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_nonfinite_loss_stops_training_and_saves_no_bad_model(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "data")
    proc = run_training(root, tmp_path / "run", "--max_steps", "40", "--learning_rate", "1e30")
    message = error_text(proc)
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert ("training loss is" in message or "became NaN or infinite" in message), proc.stderr[-3000:]
    assert "img" in message  # the batch's items are named
    assert "Traceback" not in proc.stderr
    models = tmp_path / "run" / "models"
    assert not (models / "model.pt").exists()
    for ckpt in models.glob("checkpoint_epoch=*.pt"):  # whatever was kept is finite
        state = torch.load(ckpt, weights_only=True)["network"]
        assert all(torch.isfinite(w).all() for w in state.values())


def test_parent_relative_paths_keep_their_pseudo_labels_across_a_resume(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "data")
    lists = tmp_path / "lists"
    lists.mkdir()
    content = json.loads((data / "datalist.json").read_text())
    for item in content["training"]:
        for key in ("image", "scribble", "label"):
            item[key] = "../data/" + item[key]
    (lists / "datalist.json").write_text(json.dumps(content))
    proc = run_training(lists, tmp_path / "run", "--max_steps", "6")
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = [p.name for p in (tmp_path / "run" / "runs" / "train" / "ema").iterdir()]
    assert sum(n.endswith(".npy") for n in names) == 3 and not any(n.startswith(".") for n in names)
    ckpt = torch.load(tmp_path / "run" / "models" / "checkpoint_final.pt", weights_only=True)
    assert len(ckpt["ema_store"]["items"]) == 3


def test_legacy_store_is_migrated(tmp_path: Path) -> None:
    from s2l_monai.data.datalist import item_id
    from s2l_monai.ensemble import EMAStore

    old = EMAStore(tmp_path / "ema")
    old.update("images__img0", np.full((2, 4, 4), 0.5, np.float32), 1.0)  # the <= 0.4 id of images/img0.png
    (tmp_path / "ema" / ".x.12345678.tmp.npy").write_bytes(b"stale")  # left by a killed process
    store = EMAStore(tmp_path / "ema", aliases={"images__img0": item_id("images/img0.png")})
    assert store.ids() == [item_id("images/img0.png")]
    assert not list((tmp_path / "ema").glob(".*tmp*"))
    state = {"num_classes": 2, "dtype": "float16", "items": {"images__img1": torch.zeros(1, 4, 4, dtype=torch.float16)}}
    EMAStore(tmp_path / "ema2", aliases={"images__img1": item_id("images/img1.png")}).load_state_dict(state)
    assert EMAStore(tmp_path / "ema2").ids() == [item_id("images/img1.png")]


def _infer(input_dir: Path, model: Path, out: Path, *overrides: str):
    import os
    import subprocess
    import sys

    from reliability_cases import REPO_ROOT

    cmd = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", "configs/inference.json",
           "--ckpt_path", str(model), "--input_dir", str(input_dir), "--output_dir", str(out), *overrides]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    env.pop("S2L_DEBUG", None)
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=600)


def test_inference_goes_on_past_bad_files(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "data")
    proc = run_training(root, tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = tmp_path / "run" / "models" / "model.pt"
    images = root / "images"
    (images / "zero.png").write_bytes(b"")
    nan = np.asarray(Image.open(images / "img0.png")).astype(np.float32)
    nan[:3, :3] = np.nan
    tifffile.imwrite(images / "nan.tif", nan)
    before = snapshot(images)
    proc = _infer(images, model, tmp_path / "out")
    message = error_text(proc)
    assert proc.returncode != 0
    assert str(images / "zero.png") in message and str(images / "nan.tif") in message
    assert "3 image(s) were segmented" in message and "Traceback" not in proc.stderr
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == [f"img{k}_{kind}.png" for k in range(3) for kind in ("instances", "semantic")]
    assert snapshot(images) == before
    # with the explicit key the NaN image is segmented too (the empty file still fails)
    proc = _infer(images, model, tmp_path / "out2", "--nonfinite_pixels", "replace")
    assert proc.returncode != 0 and (tmp_path / "out2" / "nan_semantic.png").exists()
    assert str(images / "zero.png") in error_text(proc) and "nan.tif" not in error_text(proc)


# ---------------------------------------------------------------------------------------------------------------
# kill -9 and exact resume
# ---------------------------------------------------------------------------------------------------------------

KILL_STEPS = 24  # 6 images, batch_size 4 // num_samples 4 = 1 image per step: 4 epochs of 6 steps


def _final_state(run: Path) -> dict:
    ckpt = torch.load(run / "models" / "checkpoint_final.pt", weights_only=True)
    return {"network": ckpt["network"], "ema": ckpt["ema_store"]["items"], "trainer": ckpt["trainer"],
            "schedule": ckpt["schedule"]}


def _assert_same(a: dict, b: dict) -> None:
    assert a["trainer"]["iteration"] == b["trainer"]["iteration"] == KILL_STEPS
    for k in a["network"]:
        torch.testing.assert_close(a["network"][k], b["network"][k], rtol=1e-5, atol=1e-6)
    assert sorted(a["ema"]) == sorted(b["ema"])
    for k in a["ema"]:
        torch.testing.assert_close(a["ema"][k].float(), b["ema"][k].float(), rtol=0, atol=1e-3)
    assert a["schedule"]["step"] == b["schedule"]["step"]  # its "seconds" are wall time


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    data = write_dataset(tmp / "data", n=6)
    proc = run_training(data, tmp / "run", "--max_steps", str(KILL_STEPS), "--num_workers", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return data, _final_state(tmp / "run")


@pytest.mark.parametrize(
    ("point", "n"),
    [("step", None), ("ensemble_item", None), ("checkpoint_write", None), ("checkpoint_write", 5)],
    ids=["step", "ensemble_item", "checkpoint_write", "final_checkpoint_write"],
)
def test_kill_9_then_resume_matches_the_uninterrupted_run(point: str, n, uninterrupted, tmp_path: Path) -> None:
    data, reference = uninterrupted
    # seeded random point: which pass through the fault point kills the process (the 5th checkpoint write is
    # checkpoint_final.pt, after the last epoch's: the resumed run has nothing left to train)
    limits = {"step": (2, KILL_STEPS - 1), "ensemble_item": (1, 12), "checkpoint_write": (1, 4)}
    n = n or random.Random(f"s2l-{point}").randint(*limits[point])
    run = tmp_path / "run"
    killed = run_training(data, run, "--max_steps", str(KILL_STEPS), "--num_workers", "1", "--resume_from", "latest",
                          env={FAULT_ENV: f"{point}:{n}"})
    assert killed.returncode == -9, (point, n, killed.stderr[-2000:])
    assert not (run / "models" / "checkpoint_final.pt").exists()
    resumed = run_training(data, run, "--max_steps", str(KILL_STEPS), "--num_workers", "1", "--resume_from", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same(reference, _final_state(run))
    models = run / "models"
    assert len(list(models.glob("checkpoint_epoch=*.pt"))) <= 2  # keep_checkpoints, across attempts
    assert not list(models.glob(".*tmp*")) and not list((run / "runs" / "train" / "ema").glob(".*tmp*"))
