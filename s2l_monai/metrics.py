"""Evaluation metrics for nucleus segmentation (Scribble2Label, section 3.3, and the field's instance metrics).

All functions take numpy label arrays of shape ``HW`` (they also work on ``DHW``): background 0, every other value
one instance (ids need not be consecutive). Metrics:

* :func:`semantic_iou` -- foreground IoU per image (the paper's "IoU", averaged over test images).
* :func:`mdice` / :func:`dice_per_nucleus` -- mDice after Nishimura et al., MICCAI 2019, pooled over nuclei.
* :func:`mdice_paper_compatible` -- the Scribble2Label authors' variant with its known defects (report as such).
* :func:`match_instances`, :func:`dsb_score`, :func:`f1_at`, :func:`panoptic_quality`, :func:`aji`.
* :func:`evaluate_pair`, :func:`summarise`, :func:`write_reports` -- per-image records and dataset summaries.

All pairwise overlaps come from one contingency table (``np.bincount`` over combined label indices), so an image
with hundreds of nuclei costs one pass over its pixels, not one per pair of instances.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from scipy.optimize import linear_sum_assignment

from s2l_monai.instances import connected_instances

__all__ = [
    "DSB_THRESHOLDS",
    "Matching",
    "Overlap",
    "PanopticQuality",
    "aji",
    "dice_per_nucleus",
    "dsb_score",
    "evaluate_pair",
    "f1_at",
    "match_from_iou",
    "match_instances",
    "mdice",
    "mdice_paper_compatible",
    "overlap",
    "panoptic_quality",
    "semantic_iou",
    "summarise",
    "write_reports",
]

#: IoU thresholds of the Data Science Bowl 2018 score: 0.50, 0.55, ..., 0.95.
DSB_THRESHOLDS: tuple[float, ...] = tuple(np.round(np.arange(0.5, 0.951, 0.05), 2).tolist())


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt must have the same shape, got {pred.shape} and {gt.shape}")
    return pred, gt


# ---------------------------------------------------------------------------------------------------------------------
# Contingency table
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Overlap:
    """Pairwise overlaps between the GT and predicted instances of one image.

    Attributes:
        gt_ids: ``(G,)`` GT instance ids (background excluded), sorted.
        pred_ids: ``(P,)`` predicted instance ids, sorted.
        intersection: ``(G, P)`` pixel counts ``|G_i ∩ P_j|``.
        gt_area: ``(G,)`` pixel counts of the GT instances.
        pred_area: ``(P,)`` pixel counts of the predicted instances.
    """

    gt_ids: np.ndarray
    pred_ids: np.ndarray
    intersection: np.ndarray
    gt_area: np.ndarray
    pred_area: np.ndarray

    @property
    def union(self) -> np.ndarray:
        """``(G, P)`` pixel counts ``|G_i ∪ P_j|``."""
        return self.gt_area[:, None] + self.pred_area[None, :] - self.intersection

    @property
    def iou(self) -> np.ndarray:
        """``(G, P)`` IoU matrix (float64)."""
        union = self.union
        return np.divide(self.intersection, union, out=np.zeros(union.shape), where=union > 0)


def overlap(pred: np.ndarray, gt: np.ndarray) -> Overlap:
    """Contingency table of two label maps in one vectorised pass.

    Hand-written because neither scikit-image nor MONAI exposes the raw table for arbitrary (non-consecutive) ids:
    ``skimage.metrics.contingency_table`` needs non-negative ids and returns a sparse matrix indexed by raw id,
    MONAI loops over instances in Python. Ids are compacted with ``np.unique(return_inverse=True)`` and the joint
    histogram is one ``np.bincount`` of ``gt_index * (P + 1) + pred_index``.

    Args:
        pred: ``HW`` predicted label map.
        gt: ``HW`` ground-truth label map.

    Returns:
        The :class:`Overlap` (background row/column removed).
    """
    pred, gt = _check_pair(pred, gt)
    g_vals, g_idx = np.unique(gt.ravel(), return_inverse=True)
    p_vals, p_idx = np.unique(pred.ravel(), return_inverse=True)
    if (g_vals.size and g_vals[0] < 0) or (p_vals.size and p_vals[0] < 0):
        raise ValueError("label maps must be non-negative (0 = background)")
    # Make sure index 0 is the background in both (prepend it when an image has no background pixel).
    if g_vals.size == 0 or g_vals[0] != 0:
        g_vals, g_idx = np.concatenate([[0], g_vals]), g_idx + 1
    if p_vals.size == 0 or p_vals[0] != 0:
        p_vals, p_idx = np.concatenate([[0], p_vals]), p_idx + 1
    n_g, n_p = g_vals.size, p_vals.size
    table = np.bincount(g_idx.astype(np.int64) * n_p + p_idx, minlength=n_g * n_p).reshape(n_g, n_p)
    return Overlap(
        gt_ids=g_vals[1:],
        pred_ids=p_vals[1:],
        intersection=table[1:, 1:],
        gt_area=table[1:, :].sum(axis=1),
        pred_area=table[:, 1:].sum(axis=0),
    )


# ---------------------------------------------------------------------------------------------------------------------
# Semantic IoU
# ---------------------------------------------------------------------------------------------------------------------


def semantic_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Foreground IoU ``|P ∩ G| / |P ∪ G|`` of ``pred > 0`` and ``gt > 0`` (Scribble2Label, sect. 3.3, "IoU").

    Args:
        pred: ``HW`` predicted mask or label map.
        gt: ``HW`` ground-truth mask or label map.

    Returns:
        The IoU in [0, 1]. Empty prediction and empty GT (union 0): 1.0, since the prediction is exactly right.
    """
    pred, gt = _check_pair(pred, gt)
    p, g = pred > 0, gt > 0
    union = int(np.count_nonzero(p | g))
    if union == 0:
        return 1.0
    return float(np.count_nonzero(p & g) / union)


# ---------------------------------------------------------------------------------------------------------------------
# mDice (Nishimura et al. 2019)
# ---------------------------------------------------------------------------------------------------------------------


def _dice_per_nucleus(ov: Overlap) -> np.ndarray:
    if ov.gt_ids.size == 0:
        return np.zeros(0)
    if ov.pred_ids.size == 0:
        return np.zeros(ov.gt_ids.size)
    best = np.argmax(ov.intersection, axis=1)  # "overlaps it most" = largest intersection; ties -> smallest pred id
    rows = np.arange(ov.gt_ids.size)
    inter = ov.intersection[rows, best]
    return np.where(inter > 0, 2.0 * inter / (ov.gt_area + ov.pred_area[best]), 0.0)


def dice_per_nucleus(pred_instances: np.ndarray, gt_instances: np.ndarray, min_gt_size: int = 0) -> np.ndarray:
    """Per-nucleus Dice after Nishimura et al. (MICCAI 2019), as used for mDice by Scribble2Label.

    For each GT nucleus ``G_i``: the predicted instance ``P_j`` with the largest overlap ``|G_i ∩ P_j|`` (ties: the
    smallest predicted id); ``Dice = 2 |G_i ∩ P_j| / (|G_i| + |P_j|)``; 0 if no predicted instance overlaps.
    False-positive instances are not scored by this metric.

    Args:
        pred_instances: ``HW`` predicted instance label map.
        gt_instances: ``HW`` GT instance label map.
        min_gt_size: GT nuclei with fewer pixels are excluded (0 = score every nucleus, our default). method.md
            says the authors' copy scores nuclei under 20 px as 1.0 "instead of being excluded"; pass 20 to exclude
            them as the original presumably did.

    Returns:
        ``(G,)`` Dice values in GT-id order (``G`` = number of scored nuclei).
    """
    ov = overlap(pred_instances, gt_instances)
    dice = _dice_per_nucleus(ov)
    return dice[ov.gt_area >= min_gt_size] if min_gt_size > 0 else dice


def mdice(
    pred_instances: np.ndarray | Sequence[np.ndarray],
    gt_instances: np.ndarray | Sequence[np.ndarray],
    pooled: bool = True,
    min_gt_size: int = 0,
) -> float:
    """mDice (Nishimura et al., MICCAI 2019): mean per-nucleus Dice (see :func:`dice_per_nucleus`).

    Args:
        pred_instances: one ``HW`` predicted instance map, or a list/tuple of them (a dataset).
        gt_instances: the matching ``HW`` GT instance map(s).
        pooled: for a dataset, ``True`` averages over all nuclei of all images (the original definition);
            ``False`` averages per image, then over images (what the Scribble2Label authors' code does).
        min_gt_size: see :func:`dice_per_nucleus`.

    Returns:
        The mDice; ``nan`` when there is no GT nucleus at all (mDice does not score false positives, so it is
        undefined there).
    """
    if isinstance(pred_instances, np.ndarray) and isinstance(gt_instances, np.ndarray):
        preds, gts = [pred_instances], [gt_instances]
    else:
        preds, gts = list(pred_instances), list(gt_instances)
        if len(preds) != len(gts):
            raise ValueError(f"got {len(preds)} predictions for {len(gts)} GT maps")
    per_image = [dice_per_nucleus(p, g, min_gt_size) for p, g in zip(preds, gts)]
    if pooled:
        values = np.concatenate(per_image) if per_image else np.zeros(0)
        return float(values.mean()) if values.size else math.nan
    means = [float(v.mean()) for v in per_image if v.size]
    return float(np.mean(means)) if means else math.nan


def mdice_paper_compatible(
    pred_binary: np.ndarray, gt_instances: np.ndarray, min_size: int = 64, tiny_gt_size: int = 20
) -> float:
    """Per-image mDice as computed by the Scribble2Label authors' code -- defects included; report only as such.

    Reproduces what ``/work/shared/docs/method.md`` ("Evaluation") states about the authors' copy of the
    Nishimura et al. (2019) metric:

    1. Predicted instances are the connected components of the binary prediction after removing objects under
       ``min_size`` (64) pixels and filling holes (:func:`s2l_monai.instances.connected_instances`).
    2. Defect: GT nuclei under ``tiny_gt_size`` (20) pixels are scored 1.0 instead of being excluded.
    3. Defect: the result is a per-image mean; a dataset value is the mean over images
       (:func:`summarise` does that), where the original pools all nuclei.

    Not reproduced: method.md also says "some nuclei on the image border can be scored 1.0", without saying which;
    we do not guess the rule, so values can differ from the authors' on images with border nuclei. Assumed:
    "overlaps it most" = largest intersection, and 8-connectivity for the components (``skimage.measure.label``
    default).

    Args:
        pred_binary: ``HW`` binary prediction (any label map is binarised with ``> 0``).
        gt_instances: ``HW`` GT instance label map.
        min_size: small-object threshold of the post-processing.
        tiny_gt_size: GT nuclei with fewer pixels than this score 1.0.

    Returns:
        The per-image mean; ``nan`` when the image has no GT nucleus.
    """
    pred_binary, gt_instances = _check_pair(pred_binary, gt_instances)
    pred_inst = connected_instances(pred_binary > 0, min_size=min_size, fill_holes=True)
    ov = overlap(pred_inst, gt_instances)
    dice = _dice_per_nucleus(ov)
    if dice.size == 0:
        return math.nan
    dice = np.where(ov.gt_area < tiny_gt_size, 1.0, dice)
    return float(dice.mean())


# ---------------------------------------------------------------------------------------------------------------------
# One-to-one matching and matching-based scores
# ---------------------------------------------------------------------------------------------------------------------


class Matching(NamedTuple):
    """One-to-one matching of GT and predicted instances at an IoU threshold.

    Attributes:
        iou: ``(G, P)`` IoU matrix.
        gt_ids: ``(G,)`` GT ids (rows of ``iou``).
        pred_ids: ``(P,)`` predicted ids (columns of ``iou``).
        gt_index: ``(TP,)`` row indices of the matched pairs.
        pred_index: ``(TP,)`` column indices of the matched pairs.
        matched_iou: ``(TP,)`` IoU of the matched pairs (all ``> threshold``).
        threshold: the IoU threshold.
    """

    iou: np.ndarray
    gt_ids: np.ndarray
    pred_ids: np.ndarray
    gt_index: np.ndarray
    pred_index: np.ndarray
    matched_iou: np.ndarray
    threshold: float

    @property
    def tp(self) -> int:
        return int(self.gt_index.size)

    @property
    def fp(self) -> int:
        return int(self.pred_ids.size - self.gt_index.size)

    @property
    def fn(self) -> int:
        return int(self.gt_ids.size - self.gt_index.size)


def match_from_iou(iou: np.ndarray, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching on an IoU matrix: pairs with IoU strictly above ``threshold``.

    For ``threshold >= 0.5`` a GT and a predicted instance with IoU > 0.5 are each other's only such partner
    (Kirillov et al., "Panoptic Segmentation", CVPR 2019, Theorem 1), so thresholding is the unique matching. Below
    0.5 that no longer holds; we use the Hungarian algorithm (``scipy.optimize.linear_sum_assignment``) maximising
    the total IoU over the candidate pairs (IoU > threshold; entries at or below it are zeroed first so that
    non-matching pairs cannot steer the assignment). MONAI's ``compute_panoptic_quality`` runs the assignment on the
    raw matrix instead; the two agree except in rare ties.

    Args:
        iou: ``(G, P)`` IoU matrix.
        threshold: IoU threshold in (0, 1].

    Returns:
        ``(gt_index, pred_index)`` integer arrays of the matched pairs.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    candidates = iou > threshold
    if threshold >= 0.5:
        gi, pi = np.nonzero(candidates)
        return gi, pi
    rows = np.flatnonzero(candidates.any(axis=1))
    cols = np.flatnonzero(candidates.any(axis=0))
    if rows.size == 0:
        return np.zeros(0, dtype=np.intp), np.zeros(0, dtype=np.intp)
    sub = np.where(candidates[np.ix_(rows, cols)], iou[np.ix_(rows, cols)], 0.0)
    r, c = linear_sum_assignment(sub, maximize=True)
    keep = sub[r, c] > threshold
    return rows[r[keep]], cols[c[keep]]


def _matching(ov: Overlap, threshold: float, iou: np.ndarray | None = None) -> Matching:
    iou = ov.iou if iou is None else iou
    gi, pi = match_from_iou(iou, threshold)
    return Matching(iou, ov.gt_ids, ov.pred_ids, gi, pi, iou[gi, pi], float(threshold))


def match_instances(pred: np.ndarray, gt: np.ndarray, threshold: float = 0.5) -> Matching:
    """IoU matrix (one contingency table) and the one-to-one matching at ``threshold`` (see :func:`match_from_iou`).

    Args:
        pred: ``HW`` predicted instance label map.
        gt: ``HW`` GT instance label map.
        threshold: IoU threshold; a pair matches when IoU > threshold.

    Returns:
        The :class:`Matching` (``tp``, ``fp``, ``fn`` as properties).
    """
    return _matching(overlap(pred, gt), threshold)


def _dsb(ov: Overlap, thresholds: Sequence[float]) -> float:
    if ov.gt_ids.size == 0 and ov.pred_ids.size == 0:
        return 1.0
    iou = ov.iou
    scores = []
    for t in thresholds:
        m = _matching(ov, t, iou)
        scores.append(m.tp / (m.tp + m.fp + m.fn))
    return float(np.mean(scores))


def dsb_score(pred: np.ndarray, gt: np.ndarray, thresholds: Sequence[float] = DSB_THRESHOLDS) -> float:
    """Data Science Bowl 2018 score: mean over IoU thresholds 0.50:0.05:0.95 of ``TP / (TP + FP + FN)``.

    Kaggle 2018 Data Science Bowl evaluation (Caicedo et al., Nature Methods 2019): a predicted nucleus is a TP
    at threshold ``t`` when its IoU with a GT nucleus is above ``t`` (one-to-one, :func:`match_from_iou`).

    Args:
        pred: ``HW`` predicted instance label map.
        gt: ``HW`` GT instance label map.
        thresholds: IoU thresholds.

    Returns:
        The score in [0, 1]; 1.0 when both maps are empty (nothing to find, nothing predicted), 0.0 when exactly
        one is empty.
    """
    return _dsb(overlap(pred, gt), thresholds)


def _f1(m: Matching) -> float:
    denom = 2 * m.tp + m.fp + m.fn
    return 1.0 if denom == 0 else 2.0 * m.tp / denom


def f1_at(pred: np.ndarray, gt: np.ndarray, threshold: float = 0.5) -> float:
    """Object-level F1 ``2TP / (2TP + FP + FN)`` with one-to-one matching at IoU > ``threshold``.

    Args:
        pred: ``HW`` predicted instance label map.
        gt: ``HW`` GT instance label map.
        threshold: IoU threshold (0.5 is the usual "F1 at IoU 0.5").

    Returns:
        F1 in [0, 1]; 1.0 when both maps are empty.
    """
    return _f1(match_instances(pred, gt, threshold))


class PanopticQuality(NamedTuple):
    """Panoptic quality of one image (Kirillov et al., CVPR 2019), with its counts for dataset-level pooling.

    Attributes:
        pq: ``SQ * RQ = sum(IoU of TP) / (TP + FP/2 + FN/2)``.
        sq: mean IoU of the matched pairs (0 when there is no TP).
        rq: ``TP / (TP + FP/2 + FN/2)`` (an F1 score).
        tp: matched pairs.
        fp: unmatched predictions.
        fn: unmatched GT instances.
        iou_sum: summed IoU of the matched pairs.
    """

    pq: float
    sq: float
    rq: float
    tp: int
    fp: int
    fn: int
    iou_sum: float


def _pq(m: Matching) -> PanopticQuality:
    tp, fp, fn = m.tp, m.fp, m.fn
    iou_sum = float(m.matched_iou.sum())
    if tp + fp + fn == 0:
        return PanopticQuality(1.0, 1.0, 1.0, 0, 0, 0, 0.0)
    rq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = iou_sum / tp if tp else 0.0
    return PanopticQuality(sq * rq, sq, rq, tp, fp, fn, iou_sum)


def panoptic_quality(pred: np.ndarray, gt: np.ndarray, threshold: float = 0.5) -> PanopticQuality:
    """Panoptic quality PQ = SQ x RQ for one class (nuclei), Kirillov et al., CVPR 2019.

    Matches ``monai.metrics.compute_panoptic_quality`` (pairs with IoU strictly above ``threshold``), without its
    ``1e-6`` smoothing term.

    Args:
        pred: ``HW`` predicted instance label map.
        gt: ``HW`` GT instance label map.
        threshold: IoU threshold (0.5 in the standard definition).

    Returns:
        :class:`PanopticQuality`; PQ = SQ = RQ = 1.0 when both maps are empty (our convention; MONAI returns 0).
    """
    return _pq(match_instances(pred, gt, threshold))


def _aji(ov: Overlap) -> float:
    if ov.gt_ids.size == 0 and ov.pred_ids.size == 0:
        return 1.0
    if ov.gt_ids.size == 0:
        return 0.0
    if ov.pred_ids.size == 0:
        return 0.0
    iou = ov.iou
    rows = np.arange(ov.gt_ids.size)
    best = np.argmax(iou, axis=1)
    hit = iou[rows, best] > 0
    inter = float(ov.intersection[rows[hit], best[hit]].sum())
    # A GT nucleus overlapping no prediction adds only its own area to the union (not that of an arbitrary
    # prediction, a known bug of the reference MATLAB code; as in HoVer-Net's ``get_fast_aji``).
    union = float(ov.union[rows[hit], best[hit]].sum() + ov.gt_area[~hit].sum())
    used = np.zeros(ov.pred_ids.size, dtype=bool)
    used[best[hit]] = True
    union += float(ov.pred_area[~used].sum())
    return inter / union


def aji(pred: np.ndarray, gt: np.ndarray) -> float:
    """Aggregated Jaccard index (Kumar et al., IEEE TMI 2017).

    For each GT nucleus ``G_i`` the predicted instance ``S_j`` with maximal IoU: add ``|G_i ∩ S_j|`` to C and
    ``|G_i ∪ S_j|`` to U (a prediction may serve several GT nuclei, as in the original AJI, not AJI+). A GT nucleus
    with no overlapping prediction adds ``|G_i|`` to U. Every predicted instance never chosen adds its area to U.
    AJI = C / U.

    Args:
        pred: ``HW`` predicted instance label map.
        gt: ``HW`` GT instance label map.

    Returns:
        AJI in [0, 1]; 1.0 when both maps are empty, 0.0 when exactly one is.
    """
    return _aji(overlap(pred, gt))


# ---------------------------------------------------------------------------------------------------------------------
# Per-image records, dataset summaries, reports
# ---------------------------------------------------------------------------------------------------------------------

#: Scalar per-image fields of :func:`evaluate_pair`, in report order.
RECORD_FIELDS = (
    "name",
    "iou",
    "mdice",
    "mdice_paper",
    "dsb",
    "f1_50",
    "pq",
    "sq",
    "rq",
    "aji",
    "n_gt",
    "n_pred",
    "tp_50",
    "fp_50",
    "fn_50",
)


def evaluate_pair(
    pred_instances: np.ndarray,
    gt_instances: np.ndarray,
    pred_semantic: np.ndarray | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """All metrics for one image, from one contingency table.

    Args:
        pred_instances: ``HW`` predicted instance label map (after the chosen post-processing).
        gt_instances: ``HW`` GT instance label map.
        pred_semantic: ``HW`` binary (or label) prediction used for the semantic IoU and the paper-compatible
            mDice; ``None`` uses ``pred_instances > 0``.
        name: image identifier stored in the record.

    Returns:
        Record with the scalar fields of ``RECORD_FIELDS`` (``iou``: :func:`semantic_iou`; ``mdice``: per-image
        mean of :func:`dice_per_nucleus`; ``mdice_paper``: :func:`mdice_paper_compatible`; ``dsb``; ``f1_50``;
        ``pq``/``sq``/``rq`` at IoU > 0.5; ``aji``; counts) and ``dice_per_nucleus`` (``(G,)`` array for pooling).
    """
    pred_instances, gt_instances = _check_pair(pred_instances, gt_instances)
    semantic = pred_instances > 0 if pred_semantic is None else np.asarray(pred_semantic) > 0
    _check_pair(semantic, gt_instances)
    ov = overlap(pred_instances, gt_instances)
    iou = ov.iou
    dice = _dice_per_nucleus(ov)
    m50 = _matching(ov, 0.5, iou)
    pq = _pq(m50)
    return {
        "name": name if name is not None else "",
        "iou": semantic_iou(semantic, gt_instances),
        "mdice": float(dice.mean()) if dice.size else math.nan,
        "mdice_paper": mdice_paper_compatible(semantic, gt_instances),
        "dsb": _dsb(ov, DSB_THRESHOLDS),
        "f1_50": _f1(m50),
        "pq": pq.pq,
        "sq": pq.sq,
        "rq": pq.rq,
        "aji": _aji(ov),
        "n_gt": int(ov.gt_ids.size),
        "n_pred": int(ov.pred_ids.size),
        "tp_50": m50.tp,
        "fp_50": m50.fp,
        "fn_50": m50.fn,
        "dice_per_nucleus": dice,
    }


def _nanmean(values: Iterable[float]) -> float:
    arr = np.asarray(list(values), dtype=float)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else math.nan


def summarise(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Dataset summary of :func:`evaluate_pair` records, pooled as each metric is defined.

    * ``iou``: mean over images of the per-image foreground IoU (as in the paper).
    * ``mdice``: pooled over all GT nuclei of all images (Nishimura et al. 2019); ``mdice_per_image``: the
      per-image mean averaged over images, for reference.
    * ``mdice_paper``: mean over images of :func:`mdice_paper_compatible` (the authors' defective variant; images
      without nuclei are skipped).
    * ``dsb``, ``f1_50``, ``pq``, ``sq``, ``rq``, ``aji``: mean over images.

    Args:
        records: per-image records from :func:`evaluate_pair`.

    Returns:
        Summary dict with ``n_images``, ``n_nuclei`` and the metrics above (``nan`` where undefined).
    """
    dice = [np.asarray(r["dice_per_nucleus"], dtype=float) for r in records]
    pooled = np.concatenate(dice) if dice else np.zeros(0)
    summary: dict[str, Any] = {
        "n_images": len(records),
        "n_nuclei": int(pooled.size),
        "iou": _nanmean(r["iou"] for r in records),
        "mdice": float(pooled.mean()) if pooled.size else math.nan,
        "mdice_per_image": _nanmean(r["mdice"] for r in records),
        "mdice_paper": _nanmean(r["mdice_paper"] for r in records),
    }
    for key in ("dsb", "f1_50", "pq", "sq", "rq", "aji"):
        summary[key] = _nanmean(r[key] for r in records)
    return summary


def _json_safe(value: Any) -> Any:
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_reports(records: Sequence[dict[str, Any]], out_dir: str | Path) -> dict[str, Path]:
    """Write ``metrics.csv`` (one row per image), ``summary.json`` and ``summary.md`` into ``out_dir``.

    Args:
        records: per-image records from :func:`evaluate_pair`.
        out_dir: output folder (created if needed).

    Returns:
        Paths of the written files under the keys ``"csv"``, ``"json"``, ``"md"``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "metrics.csv", "json": out / "summary.json", "md": out / "summary.md"}

    with paths["csv"].open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(RECORD_FIELDS), extrasaction="ignore")
        writer.writeheader()
        for r in records:
            writer.writerow({k: ("" if _json_safe(r.get(k)) is None else r.get(k)) for k in RECORD_FIELDS})

    summary = summarise(records)
    paths["json"].write_text(json.dumps({k: _json_safe(v) for k, v in summary.items()}, indent=2) + "\n")

    labels = {
        "iou": "IoU (foreground, mean over images)",
        "mdice": "mDice (pooled over nuclei)",
        "mdice_per_image": "mDice (mean over images)",
        "mdice_paper": "mDice, paper-compatible (authors' defects)",
        "dsb": "DSB2018 score",
        "f1_50": "F1 @ IoU 0.5",
        "pq": "PQ",
        "sq": "SQ",
        "rq": "RQ",
        "aji": "AJI",
    }
    lines = [
        f"# Evaluation summary ({summary['n_images']} images, {summary['n_nuclei']} GT nuclei)",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for key, text in labels.items():
        value = summary[key]
        lines.append(f"| {text} | {'n/a' if math.isnan(value) else f'{value:.4f}'} |")
    paths["md"].write_text("\n".join(lines) + "\n")
    return paths
