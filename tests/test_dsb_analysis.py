"""Tests of benchmarks/dsb_analysis.py's "where the pixel errors are" section (issue 14), on hand-built arrays with
hand-computed counts and on a tiny fake work folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import dsb_analysis as da  # noqa: E402


def _square_12() -> np.ndarray:
    """12x12 label with one 7x7 nucleus (rows and columns 2..8, 49 px); its centre (5, 5) is 3 px from the ring."""
    label = np.zeros((12, 12), np.uint16)
    label[2:9, 2:9] = 1
    return label


def test_one_pixel_too_wide_is_all_boundary_error() -> None:
    label = _square_12()
    pred = label > 0
    pred[2:9, 9] = True  # the column right of the nucleus: 7 FP on the outer ring (distance 0 to the boundary)
    c = da.pixel_error_counts(label, pred)
    # one nucleus: it is the median, so it counts as large
    assert c == {"fp": 7, "fn": 0, "errors": 7, "boundary": 7, "small": 0, "large": 7, "far": 0}
    # a threshold above its area makes it small
    assert da.pixel_error_counts(label, pred, area_threshold=50)["small"] == 7


def test_far_blob_and_interior_hole() -> None:
    label = _square_12()
    pred = label > 0
    pred[10:12, 10:12] = True  # 2x2 blob: >= sqrt(8) px from the nucleus, >= sqrt(5) px from the outer ring
    pred[5, 5] = False  # FN in the middle: 3 px from the inner ring
    pred[2, 5] = False  # FN on the inner ring
    c = da.pixel_error_counts(label, pred)
    assert c == {"fp": 4, "fn": 2, "errors": 6, "boundary": 1, "small": 0, "large": 2, "far": 4}
    # a band of 3 px reaches the centre, the blob's corner (10, 10) at sqrt(5) from (8, 9) and (11, 10)/(10, 11) at
    # sqrt(8) from (9, 8)/(8, 9); (11, 11) stays out; the blob's near corner is sqrt(8) <= 3 from the nucleus
    c3 = da.pixel_error_counts(label, pred, band=3)
    assert (c3["boundary"], c3["far"], c3["large"]) == (5, 3, 3)


def test_two_nuclei_of_different_sizes() -> None:
    label = np.zeros((12, 12), np.uint16)
    label[1:4, 1:4] = 1  # 3x3 = 9 px: small (median of 9 and 25 = 17)
    label[6:11, 6:11] = 2  # 5x5 = 25 px: large
    pred = label == 2  # nucleus 1 missed: 9 FN, all within 1 px of its ring
    pred[5, 8] = True  # FP just above nucleus 2: boundary, large
    pred[0, 11] = True  # FP far from both
    pred[4, 5] = True  # FP sqrt(5) px from both nuclei (far) but 2 px from (4, 3) on nucleus 1's outer ring
    c = da.pixel_error_counts(label, pred)
    assert c == {"fp": 3, "fn": 9, "errors": 12, "boundary": 11, "small": 9, "large": 1, "far": 2}
    regions = da.error_regions(label)
    assert regions[2, 2] == da.SMALL + da.NEAR_BOUNDARY  # centre of nucleus 1: 1 px from its ring
    assert regions[8, 8] == da.LARGE + da.NEAR_BOUNDARY  # centre of nucleus 2: 2 px from its ring
    assert regions[4, 5] == da.FAR + da.NEAR_BOUNDARY and regions[0, 11] == da.FAR
    # the two buckets follow the threshold
    assert da.pixel_error_counts(label, pred, area_threshold=5)["large"] == 10
    assert da.pixel_error_counts(label, pred, area_threshold=30)["small"] == 10


def test_touching_nuclei_have_a_boundary_between_them() -> None:
    label = np.zeros((12, 12), np.uint16)
    label[2:10, 0:6] = 1  # 8x6 = 48 px (the image border is no boundary)
    label[2:10, 6:9] = 2  # 8x3 = 24 px, touching nucleus 1 along columns 5 | 6; median area 36
    pred = label > 0
    pred[5, 2] = False  # 3 px from every boundary of nucleus 1: not near, large
    pred[5, 5] = False  # nucleus 1's side of the shared edge, no background around: boundary, large
    pred[5, 6] = False  # nucleus 2's side: boundary, small
    c = da.pixel_error_counts(label, pred)
    assert c == {"fp": 0, "fn": 3, "errors": 3, "boundary": 2, "small": 1, "large": 2, "far": 0}


def test_no_nuclei_and_no_errors() -> None:
    empty = np.zeros((8, 8), np.uint16)
    pred = np.zeros((8, 8), bool)
    pred[0, 0] = True
    assert da.pixel_error_counts(empty, pred) == {"fp": 1, "fn": 0, "errors": 1, "boundary": 0, "small": 0,
                                                  "large": 0, "far": 1}
    full = np.ones((6, 6), np.uint16)  # one nucleus filling the image: no boundary anywhere
    assert da.pixel_error_counts(full, np.zeros((6, 6)))["boundary"] == 0
    label = _square_12()
    assert da.pixel_error_counts(label, label * 255)["errors"] == 0
    with pytest.raises(ValueError, match="shapes differ"):
        da.pixel_error_counts(label, np.zeros((11, 12)))


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_report_section_from_run_folders(tmp_path: Path) -> None:
    """Two test images, an S2L run with saved masks, Otsu with its masks in eval_connected itself, a pCE run without
    masks and a Full run missing one: rows for the first two, notes for the others, and the report section."""
    data = tmp_path / "data" / "fluorescence"
    label = _square_12()
    label2 = np.zeros((12, 12), np.uint16)
    label2[1:4, 1:4] = 1
    label2[6:11, 6:11] = 2
    items = []
    for name, lab in (("a", label), ("b", label2)):
        _png(data / "images" / f"{name}.png", np.zeros((12, 12), np.uint8))
        _png(data / "labels" / f"{name}.png", lab)
        scribble = np.full((12, 12), 255, np.uint8)
        scribble[5, 3:6], scribble[0, :] = 1, 0  # both classes scribbled (the class balance table needs them)
        _png(data / "scribbles_30" / f"{name}.png", scribble)
        items.append({"image": f"images/{name}.png", "scribble": f"scribbles_30/{name}.png",
                      "label": f"labels/{name}.png"})
    datalist = {"scribble_values": {"background": 0, "foreground": 1, "unlabelled": 255},
                "training": items[:1], "validation": [], "test": items}
    (data / "datalist_30.json").write_text(json.dumps(datalist))
    runs = tmp_path / "runs_default"
    pred_a = (label > 0).astype(np.uint8)
    pred_a[2:9, 9] = 1  # 7 FP at the boundary of the 49-px nucleus (large: the test median is 25)
    pred_b = (label2 > 0).astype(np.uint8)
    pred_b[0, 11] = 1  # 1 FP far away
    for sub in ("dsb_fluo_30_s2l_s0/eval_connected/predictions", "dsb_fluo_full_otsu_na/eval_connected"):
        _png(runs / sub / "a_semantic.png", pred_a)
        _png(runs / sub / "b_semantic.png", pred_b * 255)
    (runs / "dsb_fluo_30_pce_s0" / "train").mkdir(parents=True)
    _png(runs / "dsb_fluo_full_full_s0/eval_connected/predictions/a_semantic.png", pred_a)

    rows, notes, facts = da.error_locations(tmp_path, "fluorescence", "30")
    assert facts == {"threshold": 25.0, "n_nuclei": 3, "n_images": 2}
    assert rows[2] == ["otsu", 8, 0, "87.5%", "0.0%", "87.5%", "12.5%"]
    assert rows[1] == ["s2l (seed 0)", 8, 0, "87.5%", "0.0%", "87.5%", "12.5%"]
    assert rows[0][0] == "(all test pixels)" and len(rows) == 3
    assert any("pce (seed 0)" in n and "no saved semantic predictions" in n for n in notes)
    assert any("full (seed 0)" in n and "1 of 2 test masks missing" in n for n in notes)

    out = tmp_path / "report.md"
    assert da.main(["--work", str(tmp_path), "--out", str(out)]) == 0
    text = out.read_text()
    assert "## Test split: where the pixel errors are" in text
    assert "| s2l (seed 0) | 8 | 0 | 87.5% | 0.0% | 87.5% | 12.5% |" in text
    assert "Skipped: " in text and "dsb_fluo_30_pce_s0" in text
