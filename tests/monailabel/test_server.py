"""Integration test: the Scribble2Label MONAI Label app against a real ``monailabel start_server``.

Real DSB2018 fluorescence images are served from a studies folder; automatic scribbles are uploaded as MONAI
Label labels over REST (0 = nothing drawn, 2 = background_scribbles, 3 = foreground_scribbles); training runs
twice (the second run resumes from the first model and reuses its EMA store); inference on two held-out images is
compared with their full masks. Unsafe, corrupt, NaN, wrong-shape, undeclared-value and oversized uploads must be
refused and leave the datastore unchanged.

Run it with ``bash monailabel_app/run_test.sh`` (it builds the MONAI Label environment first if needed).
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from dsb_studies import TEST_IDS, TRAIN_IDS, ground_truth, iou, make_studies, scribble_label_png
from PIL import Image
from rest import Client

from s2l_monai.uncertainty import read_map

MODEL = "scribble2label"
MODEL_3D = "scribble2label_3d"
#: A TIFF stack of the held-out images (grey), served next to the 2D images: the 3D task segments it slice by slice.
STACK_ID = "heldout_stack"
#: Scribble share of the automatic scribbles (the paper's 30%).
SCRIBBLE_RATIO = 0.3
#: Short schedule for 2 CPU cores: 8 patches of 128x128 per step, one image per step (8 steps per epoch).
COMMON = {"num_samples": 8, "batch_size": 8, "ema_every": 5, "num_workers": 1}
FIRST_RUN = {**COMMON, "max_epochs": 15, "warmup_epochs": 10}
#: Second run: resumes from the first run's model; no warm-up, so the reused EMA pseudo-labels count at once.
SECOND_RUN = {**COMMON, "max_epochs": 10, "warmup_epochs": 0}
#: Floor of the mean foreground IoU over the two held-out images. MEASURED (docs/monailabel.md):
#: mean 0.5205 (0.386 and 0.655) in the run that set it; floor = that minus ~0.12 for run-to-run variation.
IOU_FLOOR = 0.40


def snapshot(root: Path, skip: tuple[str, ...] = ()) -> dict[str, tuple[int, str]]:
    """Every file under ``root`` (except top-level names in ``skip``): size and content hash."""
    import hashlib

    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and rel.parts[0] not in skip and not path.name.startswith(".lock"):
            out[str(rel)] = (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def wait_training(client: Client, timeout: float = 1800.0) -> dict:
    start = time.time()
    while time.time() - start < timeout:
        time.sleep(3)
        status = client.train_status().json()
        if status.get("status") not in ("SUBMITTED", "QUEUED", "RUNNING"):
            return status
    raise TimeoutError(f"training still running after {timeout} s")


def stack_of(zip_path: Path, image_ids: tuple[str, ...]) -> np.ndarray:
    """``ZYX`` uint8 stack of the grey versions of the images (DSB fluorescence PNGs are grey in RGB(A))."""
    import zipfile

    with zipfile.ZipFile(zip_path) as z:
        return np.stack([np.asarray(Image.open(io.BytesIO(z.read(f"{i}/images/{i}.png"))).convert("L"))
                         for i in image_ids])


def tiff_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, array)
    return buf.getvalue()


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_scribbles_train_infer_against_real_server(dsb_zip: Path, server_factory, tmp_path: Path) -> None:
    studies, bundle = tmp_path / "studies", tmp_path / "bundle"
    make_studies(dsb_zip, studies)
    tifffile.imwrite(studies / f"{STACK_ID}.tif", stack_of(dsb_zip, TEST_IDS), photometric="minisblack")
    server = server_factory(studies, bundle, tmp_path / "server.log")
    startup = server.wait_ready()
    client = Client(server.url)
    info = client.info().json()
    assert MODEL in info["trainers"] and MODEL in info["models"], info
    report: dict = {"server_startup_s": round(startup, 1)}

    # --- scribble labels, as a viewer saves them ---
    for image_id in TRAIN_IDS:
        r = client.put_label(image_id, scribble_label_png(dsb_zip, image_id, SCRIBBLE_RATIO), filename="label.png")
        assert r.status == 200, r.text
    assert client.info().json()["datastore"]["completed"] == len(TRAIN_IDS)

    # --- refused uploads leave the datastore (and everything around it) unchanged ---
    before = snapshot(tmp_path, skip=("bundle", "server.log"))
    label = scribble_label_png(dsb_zip, TRAIN_IDS[0], SCRIBBLE_RATIO)
    shape = np.asarray(Image.open(studies / f"{TRAIN_IDS[0]}.png")).shape[:2]
    nan_label = np.zeros(shape, np.float32)
    nan_label[:4, :4] = np.nan
    undeclared = np.asarray(Image.open(io.BytesIO(label))).copy()
    undeclared[:3, :3] = 7
    refused = {
        "traversal tag": client.put_label(TRAIN_IDS[0], label, tag="../../escaped"),
        "traversal image": client.put_label("../../" + TRAIN_IDS[0], label),
        "wrong shape": client.put_label(TRAIN_IDS[0], png_bytes(np.zeros((128, 200), np.uint8))),
        "NaN label": client.put_label(TRAIN_IDS[0], tiff_bytes(nan_label), filename="label.tif"),
        "undeclared values": client.put_label(TRAIN_IDS[0], png_bytes(undeclared)),
        "oversized label": client.put_label(TRAIN_IDS[0], tiff_bytes(np.zeros((1200, 1200, 2), np.uint8)),
                                            filename="label.tif"),
        "corrupt image": client.put_image("corrupt_upload", b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "corrupt.png"),
        "NaN image": client.put_image("nan_upload", tiff_bytes(nan_label), "nan.tif"),
    }
    for what, r in refused.items():
        assert 400 <= r.status < 500, (what, r.status, r.text)
        assert "refused" in r.json()["detail"], (what, r.text)
        report[f"refused {what}"] = f"{r.status} {r.json()['detail']}"
    assert "shape (128, 200) differs" in refused["wrong shape"].json()["detail"]
    assert "NaN" in refused["NaN label"].json()["detail"] and "NaN" in refused["NaN image"].json()["detail"]
    assert "[7]" in refused["undeclared values"].json()["detail"]
    assert refused["oversized label"].status == 413
    assert snapshot(tmp_path, skip=("bundle", "server.log")) == before

    # --- training: first run, then a second that resumes and reuses the EMA store ---
    for name, params in (("first", FIRST_RUN), ("second", SECOND_RUN)):
        start = time.time()
        r = client.train(MODEL, params)
        assert r.status == 200, r.text
        status = wait_training(client)
        report[f"train_{name}_s"] = round(time.time() - start, 1)
        assert status.get("status") == "DONE", json.dumps(status, indent=1)[-3000:] + server.tail()
        assert (bundle / "models" / "model.pt").is_file()
    log = server.log.read_text(errors="replace")
    assert "Starting from the previous model" in log, "second run did not start from the first model"
    # the first run had no previous model: the bundle's own default start, the shipped weights (grey images fit them)
    assert "No previous model: starting from the shipped weights where they fit" in log
    assert log.count("pretrained_weights=auto: the network starts from the shipped weights") == 1, log[-3000:]
    assert log.count("pretrained_weights: the network starts from") == 1  # the second run: its previous model
    ema_lines = [line for line in log.splitlines() if "EMA store" in line and "reused for" in line]
    assert len(ema_lines) == 2, ema_lines
    assert all(image_id in ema_lines[1] for image_id in TRAIN_IDS), ema_lines[1]  # images unchanged: all reused

    # --- where to scribble next: the "uncertain" strategy and the uncertainty map, from the last ensemble ---
    assert "uncertain" in client.info().json()["strategies"]
    unlabelled = sorted((*TEST_IDS, STACK_ID))  # the images served without a saved scribble label
    r = client.next_sample("uncertain")
    assert r.status == 200 and r.json()["id"] == unlabelled[0], r.text  # nothing scribbled there yet: first
    summary = json.loads((bundle / "runs" / "monailabel" / "train" / "uncertainty" / "uncertainty.json").read_text())
    assert summary["epoch"] and sorted(e["id"] for e in summary["items"]) == sorted(TRAIN_IDS)
    ranked = sorted(summary["items"], key=lambda e: (-e["uncertain_share"], -e["mean"], e["id"]))
    r = client.next_sample("uncertain", {"scribbled_only": True})
    assert r.status == 200 and r.json()["id"] == ranked[0]["id"], (r.text, ranked)
    report["next_sample"] = f"{ranked[0]['id'][:8]} ({100 * ranked[0]['uncertain_share']:.1f}% uncertain)"
    r = client.infer(f"{MODEL}_uncertainty", ranked[0]["id"])
    assert r.status == 200, r.text[:2000]
    overlay = np.asarray(Image.open(io.BytesIO(r.body)))
    stored = np.asarray(read_map(bundle / "runs" / "monailabel" / "train" / "uncertainty", ranked[0]))
    assert np.array_equal(overlay, stored) and overlay.shape == ground_truth(dsb_zip, ranked[0]["id"]).shape
    r = client.infer(f"{MODEL}_uncertainty", TEST_IDS[0])  # never scribbled: no map, a message instead
    assert r.status == 404 and "no uncertainty map" in r.json()["detail"], (r.status, r.text[:500])

    # --- inference on held-out images ---
    scores = []
    for image_id in TEST_IDS:
        start = time.time()
        r = client.infer(MODEL, image_id)
        assert r.status == 200, r.text[:2000]
        pred = np.asarray(Image.open(io.BytesIO(r.body)))
        truth = ground_truth(dsb_zip, image_id)
        assert pred.shape == truth.shape and set(np.unique(pred)) <= {0, 1}
        scores.append(iou(pred, truth))
        report[f"infer_{image_id[:8]}_s"] = round(time.time() - start, 1)
        report[f"iou_{image_id[:8]}"] = round(scores[-1], 4)
    report["mean_iou"] = round(float(np.mean(scores)), 4)
    report["iou_floor"] = IOU_FLOOR

    # --- the same held-out images as one TIFF stack, through the 3D task (slice by slice) ---
    start = time.time()
    r = client.infer(MODEL_3D, STACK_ID)
    assert r.status == 200, r.text[:2000]
    volume = tifffile.imread(io.BytesIO(r.body))
    assert volume.shape == (len(TEST_IDS), 256, 256) and set(np.unique(volume)) <= {0, 1}, volume.shape
    report["infer_stack_s"] = round(time.time() - start, 1)
    for k, image_id in enumerate(TEST_IDS):
        report[f"iou_stack_slice{k}"] = round(iou(volume[k], ground_truth(dsb_zip, image_id)), 4)
        # same network and per-slice preprocessing as the 2D task: the slice scores match the 2D ones
        assert abs(report[f"iou_stack_slice{k}"] - scores[k]) < 0.02, report
    print("\nMONAI Label integration:", json.dumps(report, indent=1))
    assert report["mean_iou"] >= IOU_FLOOR, report
