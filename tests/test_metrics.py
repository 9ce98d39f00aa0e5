"""Tests of s2l_monai.metrics on hand-made label maps with answers worked out by hand, and against MONAI's PQ."""

from __future__ import annotations

import io
import json
import math
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.metrics import compute_panoptic_quality
from skimage.draw import disk
from skimage.morphology import disk as disk_footprint
from skimage.morphology import erosion
from skimage.segmentation import expand_labels

from s2l_monai.instances import watershed_instances
from s2l_monai.metrics import (
    DSB_THRESHOLDS,
    aji,
    dice_per_nucleus,
    dsb_score,
    evaluate_pair,
    f1_at,
    match_from_iou,
    match_instances,
    mdice,
    mdice_paper_compatible,
    overlap,
    panoptic_quality,
    semantic_iou,
    summarise,
    write_reports,
)

# ---------------------------------------------------------------------------------------------------------------------
# Hand-made cases
# ---------------------------------------------------------------------------------------------------------------------


def _canvas() -> np.ndarray:
    return np.zeros((32, 32), dtype=np.int32)


def test_perfect_match_with_different_ids() -> None:
    gt, pred = _canvas(), _canvas()
    gt[2:6, 2:6], gt[10:14, 10:14] = 1, 2
    pred[2:6, 2:6], pred[10:14, 10:14] = 7, 3  # same objects, other ids
    assert semantic_iou(pred, gt) == 1.0
    assert mdice(pred, gt) == 1.0
    assert dsb_score(pred, gt) == 1.0
    assert f1_at(pred, gt) == 1.0
    pq = panoptic_quality(pred, gt)
    assert (pq.pq, pq.sq, pq.rq, pq.tp, pq.fp, pq.fn) == (1.0, 1.0, 1.0, 2, 0, 0)
    assert aji(pred, gt) == 1.0
    assert mdice_paper_compatible(pred > 0, gt) == 1.0  # 16 px objects: < 20 px, scored 1.0 anyway


def test_one_gt_split_into_two_predictions() -> None:
    # GT: one 4 x 8 = 32 px rectangle. Prediction: split into A = 4 x 5 = 20 px and B = 4 x 3 = 12 px.
    gt, pred = _canvas(), _canvas()
    gt[4:8, 4:12] = 1
    pred[4:8, 4:9], pred[4:8, 9:12] = 1, 2
    # IoU(GT, A) = 20/32 = 0.625, IoU(GT, B) = 12/32 = 0.375.
    m = match_instances(pred, gt)
    np.testing.assert_allclose(m.iou, [[0.625, 0.375]])
    assert (m.tp, m.fp, m.fn) == (1, 1, 0)
    assert semantic_iou(pred, gt) == 1.0
    # mDice: A overlaps most; Dice = 2*20 / (32 + 20) = 40/52 = 10/13.
    assert mdice(pred, gt) == pytest.approx(10 / 13)
    # F1 = 2*1 / (2*1 + 1 + 0) = 2/3.
    assert f1_at(pred, gt) == pytest.approx(2 / 3)
    # PQ: SQ = 0.625, RQ = 1 / (1 + 0.5) = 2/3, PQ = 0.625 * 2/3 = 5/12.
    pq = panoptic_quality(pred, gt)
    assert (pq.sq, pq.rq, pq.pq) == pytest.approx((0.625, 2 / 3, 5 / 12))
    # DSB: 0.625 > t for t in {0.50, 0.55, 0.60}: TP/(TP+FP+FN) = 1/2; for the 7 others 0/(0+2+1) = 0 -> 1.5/10.
    assert dsb_score(pred, gt) == pytest.approx(0.15)
    # AJI: C = |GT ∩ A| = 20, U = |GT ∪ A| + |B| (unused) = 32 + 12 = 44 -> 5/11.
    assert aji(pred, gt) == pytest.approx(5 / 11)


def test_missed_nucleus() -> None:
    # GT: two 5 x 5 = 25 px squares; prediction finds only the first, exactly.
    gt, pred = _canvas(), _canvas()
    gt[2:7, 2:7], gt[15:20, 15:20] = 1, 2
    pred[2:7, 2:7] = 1
    assert semantic_iou(pred, gt) == 0.5  # 25 / 50
    assert mdice(pred, gt) == 0.5  # (1 + 0) / 2
    np.testing.assert_array_equal(dice_per_nucleus(pred, gt), [1.0, 0.0])
    assert f1_at(pred, gt) == pytest.approx(2 / 3)  # TP=1, FN=1: 2 / (2 + 1)
    assert dsb_score(pred, gt) == 0.5  # 1 / (1 + 0 + 1) at every threshold
    pq = panoptic_quality(pred, gt)
    assert (pq.sq, pq.rq, pq.pq) == pytest.approx((1.0, 2 / 3, 2 / 3))
    assert aji(pred, gt) == 0.5  # C = 25, U = 25 + |missed GT| 25 = 50


def test_false_positive() -> None:
    gt, pred = _canvas(), _canvas()
    gt[2:7, 2:7] = 1
    pred[2:7, 2:7], pred[15:20, 15:20] = 1, 2  # extra 25 px object
    assert semantic_iou(pred, gt) == 0.5
    assert mdice(pred, gt) == 1.0  # mDice does not score false positives
    assert f1_at(pred, gt) == pytest.approx(2 / 3)
    assert dsb_score(pred, gt) == 0.5
    assert panoptic_quality(pred, gt).pq == pytest.approx(2 / 3)
    assert aji(pred, gt) == 0.5  # C = 25, U = 25 + unused prediction 25


def test_shifted_nucleus_known_overlap() -> None:
    # 10 x 10 = 100 px square, prediction shifted 2 columns: intersection 10 x 8 = 80, union 120.
    gt, pred = _canvas(), _canvas()
    gt[5:15, 5:15] = 1
    pred[5:15, 7:17] = 1
    assert semantic_iou(pred, gt) == pytest.approx(2 / 3)  # 80 / 120
    assert mdice(pred, gt) == pytest.approx(0.8)  # 2*80 / (100 + 100)
    assert f1_at(pred, gt) == 1.0  # IoU 2/3 > 0.5
    assert f1_at(pred, gt, threshold=0.7) == 0.0  # 2/3 < 0.7: FP + FN
    # DSB: IoU 0.667 > t for t in {0.50, 0.55, 0.60, 0.65} -> 4 of 10 thresholds score 1.
    assert dsb_score(pred, gt) == pytest.approx(0.4)
    pq = panoptic_quality(pred, gt)
    assert (pq.sq, pq.rq, pq.pq) == pytest.approx((2 / 3, 1.0, 2 / 3))
    assert aji(pred, gt) == pytest.approx(2 / 3)


def test_empty_cases() -> None:
    empty, one = _canvas(), _canvas()
    one[5:15, 5:15] = 3
    # Both empty: every metric defined as perfect, except mDice (no nucleus to score -> nan).
    assert semantic_iou(empty, empty) == 1.0
    assert dsb_score(empty, empty) == 1.0
    assert f1_at(empty, empty) == 1.0
    assert panoptic_quality(empty, empty).pq == 1.0
    assert aji(empty, empty) == 1.0
    assert math.isnan(mdice(empty, empty))
    # Empty GT, one false positive / GT present, empty prediction: everything 0 (mDice: nan / 0).
    for pred, gt in ((one, empty), (empty, one)):
        assert semantic_iou(pred, gt) == 0.0
        assert dsb_score(pred, gt) == 0.0
        assert f1_at(pred, gt) == 0.0
        assert panoptic_quality(pred, gt).pq == 0.0
        assert aji(pred, gt) == 0.0
    assert math.isnan(mdice(one, empty))
    assert mdice(empty, one) == 0.0
    assert mdice_paper_compatible(empty, one) == 0.0


def test_paper_compatible_mdice_differs_on_tiny_missed_nucleus() -> None:
    # GT: a 10 x 10 = 100 px nucleus, found exactly, and a 3 x 3 = 9 px nucleus (< 20 px), missed.
    gt, pred = _canvas(), _canvas()
    gt[5:15, 5:15] = 1
    gt[25:28, 25:28] = 2
    pred[5:15, 5:15] = 1
    assert mdice(pred, gt) == 0.5  # correct: (1 + 0) / 2
    assert mdice_paper_compatible(pred > 0, gt) == 1.0  # authors' defect: tiny nucleus scored 1.0 -> (1 + 1) / 2
    assert mdice(pred, gt, min_gt_size=20) == 1.0  # excluding it instead: only the big nucleus is scored


def test_paper_compatible_mdice_removes_small_predictions_and_fills_holes() -> None:
    # A 7 x 7 = 49 px nucleus predicted exactly: kept by the correct mDice (given instances), removed by the
    # paper's post-processing (< 64 px) -> Dice 0.
    gt = _canvas()
    gt[2:9, 2:9] = 1
    assert mdice(gt, gt) == 1.0
    assert mdice_paper_compatible(gt > 0, gt) == 0.0
    # A hole in the prediction is filled before scoring: 12 x 12 square with a 2 x 2 hole -> Dice 1.
    gt = _canvas()
    gt[4:16, 4:16] = 1
    pred = gt > 0
    pred[9:11, 9:11] = False
    assert mdice_paper_compatible(pred, gt) == 1.0
    assert mdice(pred.astype(np.int32), gt) == pytest.approx(2 * 140 / (144 + 140))


def test_mdice_pooled_over_nuclei_vs_per_image() -> None:
    # Image 1: one nucleus, Dice 1. Image 2: three nuclei, all missed (Dice 0).
    g1, p1 = _canvas(), _canvas()
    g1[2:8, 2:8] = 1
    p1[2:8, 2:8] = 1
    g2, p2 = _canvas(), _canvas()
    g2[2:8, 2:8], g2[12:18, 12:18], g2[22:28, 22:28] = 1, 2, 3
    assert mdice([p1, p2], [g1, g2]) == pytest.approx(0.25)  # pooled: (1 + 0 + 0 + 0) / 4
    assert mdice([p1, p2], [g1, g2], pooled=False) == pytest.approx(0.5)  # per image: (1 + 0) / 2
    records = [evaluate_pair(p1, g1, name="a"), evaluate_pair(p2, g2, name="b")]
    s = summarise(records)
    assert s["n_images"] == 2 and s["n_nuclei"] == 4
    assert s["mdice"] == pytest.approx(0.25)
    assert s["mdice_per_image"] == pytest.approx(0.5)
    assert s["iou"] == pytest.approx(0.5)  # per image: 1 and 0
    assert s["pq"] == pytest.approx(0.5)


def test_hungarian_matching_below_half() -> None:
    # G1-P1 0.45, G1-P2 0.40, G2-P1 0.40: greedy "best partner" matches G1-P1 only; the Hungarian assignment that
    # maximises total IoU matches G1-P2 and G2-P1 (0.8 > 0.45).
    iou = np.array([[0.45, 0.40], [0.40, 0.0]])
    gi, pi = match_from_iou(iou, threshold=0.3)
    assert sorted(zip(gi.tolist(), pi.tolist())) == [(0, 1), (1, 0)]
    assert match_from_iou(iou, threshold=0.5)[0].size == 0
    # At a threshold of exactly the IoU, the pair does not match (strictly greater).
    assert match_from_iou(np.array([[0.5]]), threshold=0.5)[0].size == 0
    with pytest.raises(ValueError):
        match_from_iou(iou, threshold=0.0)


def test_overlap_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 6, size=(20, 20)) * 3  # non-consecutive ids
    pred = rng.integers(0, 5, size=(20, 20)) + 10 * (rng.random((20, 20)) > 0.5)
    ov = overlap(pred, gt)
    for i, g in enumerate(ov.gt_ids):
        for j, p in enumerate(ov.pred_ids):
            inter = np.count_nonzero((gt == g) & (pred == p))
            union = np.count_nonzero((gt == g) | (pred == p))
            assert ov.intersection[i, j] == inter
            assert ov.iou[i, j] == pytest.approx(inter / union)
    with pytest.raises(ValueError, match="same shape"):
        overlap(pred, gt[:10])


def test_dsb_thresholds() -> None:
    assert DSB_THRESHOLDS == (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


# ---------------------------------------------------------------------------------------------------------------------
# Agreement with MONAI's panoptic quality
# ---------------------------------------------------------------------------------------------------------------------


def _random_nuclei(rng: np.random.Generator, shape: tuple[int, int] = (128, 128), n: int = 30) -> np.ndarray:
    """Instance map of ``n`` random discs (radius 4-10 px); later discs overwrite earlier ones, so some touch."""
    lab = np.zeros(shape, dtype=np.int32)
    for i in range(1, n + 1):
        rr, cc = disk(tuple(rng.integers(0, shape[0], 2)), int(rng.integers(4, 11)), shape=shape)
        lab[rr, cc] = i
    return lab


def _perturb(gt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A realistic imperfect prediction: shift, grow, drop some nuclei, split one, add false positives."""
    pred = np.roll(gt, tuple(rng.integers(-2, 3, 2)), axis=(0, 1))
    pred = expand_labels(pred, int(rng.integers(0, 3)))
    ids = np.unique(pred[pred > 0])
    pred[np.isin(pred, rng.choice(ids, size=max(1, ids.size // 10), replace=False))] = 0
    ids = np.unique(pred[pred > 0])
    split = ids[0]
    cols = np.nonzero(pred == split)[1]
    pred[(pred == split) & (np.arange(pred.shape[1])[None, :] > np.median(cols))] = pred.max() + 1
    for _ in range(3):
        rr, cc = disk(tuple(rng.integers(0, pred.shape[0], 2)), int(rng.integers(3, 8)), shape=pred.shape)
        free = pred[rr, cc] == 0
        pred[rr[free], cc[free]] = pred.max() + 1
    perm = np.concatenate([[0], rng.permutation(np.arange(1, pred.max() + 1)) + 100])  # scrambled, gapped ids
    return perm[pred].astype(np.int32)


def _monai_pq(pred: np.ndarray, gt: np.ndarray, threshold: float = 0.5) -> tuple[float, float, float, np.ndarray]:
    p, g = torch.as_tensor(pred), torch.as_tensor(gt)
    # MONAI runs many small torch ops per instance; on a busy shared CPU, intra-op threading makes them ~50x slower.
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        values = [
            float(compute_panoptic_quality(p, g, metric_name=name, match_iou_threshold=threshold))
            for name in ("pq", "sq", "rq")
        ]
        conf = compute_panoptic_quality(p, g, match_iou_threshold=threshold, output_confusion_matrix=True).numpy()
    finally:
        torch.set_num_threads(n_threads)
    return values[0], values[1], values[2], conf


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_pq_matches_monai_on_random_label_maps(seed: int) -> None:
    rng = np.random.default_rng(seed)
    gt = _random_nuclei(rng)
    pred = _perturb(gt, rng)
    for threshold in (0.3, 0.5, 0.75):  # 0.3: Hungarian matching
        pq = panoptic_quality(pred, gt, threshold)
        m_pq, m_sq, m_rq, conf = _monai_pq(pred, gt, threshold)
        assert (pq.tp, pq.fp, pq.fn) == tuple(int(v) for v in conf[:3])
        assert pq.iou_sum == pytest.approx(conf[3], abs=1e-4)
        assert (pq.pq, pq.sq, pq.rq) == pytest.approx((m_pq, m_sq, m_rq), abs=1e-5)
        # F1 at IoU t is RQ at t.
        assert f1_at(pred, gt, threshold) == pytest.approx(pq.rq)
    assert 0.0 < panoptic_quality(pred, gt).pq < 1.0  # the perturbation is neither trivial nor total


# ---------------------------------------------------------------------------------------------------------------------
# Real data (BBBC038 / DSB2018 stage1_train.zip), skipped where absent
# ---------------------------------------------------------------------------------------------------------------------


def _read_instance_maps(zip_path: Path, n_images: int = 3) -> list[np.ndarray]:
    """Instance maps of the first ``n_images`` images (sorted ids), assembled from their per-nucleus mask PNGs."""
    from PIL import Image

    with zipfile.ZipFile(zip_path) as zf:
        masks: dict[str, list[str]] = {}
        for name in zf.namelist():
            parts = name.split("/")
            if len(parts) == 3 and parts[1] == "masks" and parts[2].endswith(".png"):
                masks.setdefault(parts[0], []).append(name)
        maps = []
        for image_id in sorted(masks)[:n_images]:
            lab = None
            for i, name in enumerate(sorted(masks[image_id]), start=1):
                m = np.asarray(Image.open(io.BytesIO(zf.read(name)))) > 0
                m = m[..., 0] if m.ndim == 3 else m
                lab = np.zeros(m.shape, dtype=np.int32) if lab is None else lab
                lab[m] = i
            maps.append(lab)
    return maps


def test_pq_matches_monai_on_real_masks(dsb_zip: Path, tmp_path: Path) -> None:
    records = []
    for k, gt in enumerate(_read_instance_maps(dsb_zip)):
        assert gt.max() > 0
        for pred in (erosion(gt, disk_footprint(1)), expand_labels(gt, 2)):
            pq = panoptic_quality(pred, gt)
            m_pq, m_sq, m_rq, conf = _monai_pq(pred, gt)
            assert (pq.tp, pq.fp, pq.fn) == tuple(int(v) for v in conf[:3])
            assert (pq.pq, pq.sq, pq.rq) == pytest.approx((m_pq, m_sq, m_rq), abs=1e-5)
        # The pipeline end to end: watershed instances of the GT foreground, scored against the GT.
        ws = watershed_instances(gt > 0, min_size=1)
        rec = evaluate_pair(ws, gt, name=f"img{k}")
        assert rec["iou"] == pytest.approx(1.0, abs=1e-3)
        assert 0.0 < rec["pq"] <= 1.0
        records.append(rec)
    paths = write_reports(records, tmp_path)
    assert json.loads(paths["json"].read_text())["n_images"] == 3


# ---------------------------------------------------------------------------------------------------------------------
# Records and reports
# ---------------------------------------------------------------------------------------------------------------------


def test_evaluate_pair_and_write_reports(tmp_path: Path) -> None:
    gt, pred = _canvas(), _canvas()
    gt[5:15, 5:15] = 1
    pred[5:15, 7:17] = 1
    rec = evaluate_pair(pred, gt, name="shifted")
    assert rec["iou"] == pytest.approx(2 / 3)
    assert rec["mdice"] == pytest.approx(0.8)
    assert rec["mdice_paper"] == pytest.approx(0.8)  # 100 px prediction survives the 64 px filter
    assert rec["dsb"] == pytest.approx(0.4)
    assert (rec["n_gt"], rec["n_pred"], rec["tp_50"], rec["fp_50"], rec["fn_50"]) == (1, 1, 1, 0, 0)
    # A semantic prediction given separately is used for IoU and the paper-compatible mDice.
    rec_sem = evaluate_pair(pred, gt, pred_semantic=gt > 0)
    assert rec_sem["iou"] == 1.0 and rec_sem["mdice_paper"] == 1.0 and rec_sem["mdice"] == pytest.approx(0.8)

    empty = evaluate_pair(_canvas(), _canvas(), name="empty")
    paths = write_reports([rec, empty], tmp_path / "reports")
    rows = paths["csv"].read_text().splitlines()
    assert rows[0].startswith("name,iou,mdice,mdice_paper,dsb")
    assert len(rows) == 3 and rows[1].startswith("shifted,")
    summary = json.loads(paths["json"].read_text())
    assert summary["n_images"] == 2 and summary["n_nuclei"] == 1
    assert summary["mdice"] == pytest.approx(0.8)  # the empty image has no nucleus to pool
    assert summary["iou"] == pytest.approx((2 / 3 + 1.0) / 2)
    md = paths["md"].read_text()
    assert "| mDice (pooled over nuclei) | 0.8000 |" in md
