"""Why a DSB run scored what it did: pixel errors of the test predictions and quality of the EMA pseudo-labels.

Reads the run folders that ``benchmarks/dsb.py`` leaves in its work folder for a profile
(``runs_<profile>/<run>/eval_connected/predictions``, ``.../train/ema`` and ``.../train/class_prior.json``; profile
``default`` unless ``--profile``) together with the prepared data's FULL masks, and writes
``benchmarks/results/dsb_analysis.md`` (other modalities or ratios: ``dsb_analysis_<modality>_<ratio>.md``; other
profiles: a ``_<profile>`` suffix):

1. per run, on the test split: pooled pixel precision and recall of the semantic mask, the predicted foreground
   area over the true one (> 1: over-segmentation), mean per-image IoU, and the same IoU on the 256x256 images
   only (the small-nuclei images);
2. per Scribble2Label / Pseudo-label run, on the training images: what the final EMA store would hand to the
   unlabelled-pixel loss, i.e. the share of unscribbled pixels whose averaged probability passes tau (coverage),
   the accuracy of those pseudo-labels against the full masks, split into foreground and background precision;
3. per scribble ratio, on the training images: the share of scribbled pixels that are foreground against the
   share of all pixels that are foreground in the full masks (the class prior the scribble losses see);
4. per run that estimated its class weights from the scribbles (``class_weights "auto"``): the foreground share it
   estimated and the weights it chose, beside the true share from the full masks;
5. per run with saved semantic predictions (Otsu too where ``s2l otsu --save-predictions`` wrote them), on the test
   split: where the pixel errors are (issue 14), i.e. false positives and negatives and the shares of them that lie
   within 2 px of a true nucleus boundary, at small or large nuclei, or in far background
   (:func:`pixel_error_counts`).

The full masks are used here for diagnosis only; training never sees them (except in the Full baseline).

Usage::

    .venv/bin/python benchmarks/dsb_analysis.py --work /tmp/s2l_dsb [--modality fluorescence --ratio 30]
    .venv/bin/python benchmarks/dsb_analysis.py --work /tmp/s2l_dsb --modality brightfield   # -> ..._brightfield_30.md
    .venv/bin/python benchmarks/dsb_analysis.py --work /tmp/s2l_dsb --profile paper-short     # -> ..._paper-short.md
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

try:
    from benchmarks import common, dsb
except ImportError:  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import common, dsb

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "dsb_analysis.md"
SHORT = {"fluorescence": "fluo", "brightfield": "bf", "histopathology": "histo"}
RUN_RE = re.compile(r"^dsb_(?P<mod>[a-z]+)_(?P<ratio>\d+|full)_(?P<method>[a-z0-9]+)_(?:s(?P<seed>\d+)|na)$")
BAND_PX = 2.0  # "at a boundary" = within this many pixels of one (issue 14)
# Codes of :func:`error_regions`: where a pixel lies relative to the true nuclei. bit 0: within the band of a boundary;
# the rest: the nucleus bucket (small / large nucleus within the band of the nucleus, or far background).
NEAR_BOUNDARY, SMALL, LARGE, FAR = 1, 0, 2, 4
N_CODES = 6


def _read(path: Path):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(path))


def run_label(m: re.Match) -> str:
    """Row label of a run folder: ``s2l (seed 0)``, or ``otsu`` (no seed)."""
    return m["method"] if m["seed"] is None else f"{m['method']} (seed {m['seed']})"


def run_dirs(work: Path, modality: str, ratio: str, profile: str = "default") -> list[tuple[Path, re.Match]]:
    """Run folders of ``modality`` at ``ratio`` and its Full / Otsu runs (ratio tag ``full``), sorted by name."""
    out = []
    for run in sorted(dsb.runs_dir(work, profile).glob(f"dsb_{SHORT[modality]}_*")):
        m = RUN_RE.match(run.name)
        if m is not None and m["ratio"] in (ratio, "full"):
            out.append((run, m))
    return out


def semantic_path(pred_dir: Path, item: dict[str, str]) -> Path:
    """The saved semantic mask of a datalist item: ``<pred_dir>/<image base name>_semantic.png``."""
    from s2l_monai.inference_io import image_stem

    return pred_dir / f"{image_stem(item['image'])}_semantic.png"


def semantic_dir(run: Path, items: Sequence[dict[str, str]]) -> tuple[Path | None, str | None]:
    """The folder of a run's saved test predictions, or ``None`` and why not.

    ``eval_connected/predictions`` (``configs/evaluate.json``'s ``prediction_dir``) or ``eval_connected`` itself
    (``s2l otsu --save-predictions`` writes there); a folder missing the mask of any item counts as none.
    """
    for folder in (run / "eval_connected" / "predictions", run / "eval_connected"):
        if folder.is_dir() and any(folder.glob("*_semantic.png")):
            missing = sum(not semantic_path(folder, item).is_file() for item in items)
            if missing:
                return None, f"{missing} of {len(items)} test masks missing in {folder.relative_to(run)}"
            return folder, None
    return None, "no saved semantic predictions"


def test_errors(pred_dir: Path, data_dir: Path, items: Sequence[dict[str, str]]) -> dict[str, float]:
    """Pooled pixel precision/recall, area ratio and mean IoU of the semantic masks in ``pred_dir``."""
    import numpy as np

    tp = fp = fn = 0
    ious, ious_256 = [], []
    for item in items:
        gt = _read(data_dir / item["label"]) > 0
        pred = _read(semantic_path(pred_dir, item)) > 0
        i, u = int((pred & gt).sum()), int((pred | gt).sum())
        tp, fp, fn = tp + i, fp + int((pred & ~gt).sum()), fn + int((~pred & gt).sum())
        ious.append(i / u if u else 1.0)
        if gt.shape == (256, 256):
            ious_256.append(ious[-1])
    return {
        "precision": tp / max(tp + fp, 1), "recall": tp / max(tp + fn, 1), "area_ratio": (tp + fp) / max(tp + fn, 1),
        "iou": float(np.mean(ious)), "iou_256": float(np.mean(ious_256)) if ious_256 else float("nan"),
        "n_256": len(ious_256),
    }


def error_regions(label: Any, area_threshold: float | None = None, band: float = BAND_PX) -> Any:
    """Where each pixel lies relative to the true nuclei of one image, as codes for :func:`count_errors`.

    - Boundary: the pixels where the instance label changes, both sides, between a nucleus and the background and
      between touching nuclei (``skimage.segmentation.find_boundaries(label, connectivity=1, mode="thick")``; the
      image border is no boundary). A pixel is *near a boundary* if its Euclidean distance to the nearest boundary
      pixel is <= ``band`` (``scipy.ndimage.distance_transform_edt`` of the complement of the boundary map), so the
      band reaches ``band`` px into a nucleus and ``band + 1`` px out of it (the outer ring is boundary too).
    - Nucleus bucket: each pixel goes to its nearest true nucleus (``distance_transform_edt`` of the background
      with ``return_indices``; a nucleus pixel is its own nearest); a pixel more than ``band`` px from every nucleus
      is *far background* (``FAR``); otherwise ``SMALL`` if that nucleus's area is below ``area_threshold``, else
      ``LARGE``.

    The code of a pixel is its bucket (``SMALL`` 0, ``LARGE`` 2, ``FAR`` 4) plus ``NEAR_BOUNDARY`` (1) when it is near
    a boundary.

    Args:
        label: ``HW`` instance label map (non-negative integers, background 0).
        area_threshold: nucleus area (pixels) from which a nucleus counts as large; ``None``: the median area of this
            image's nuclei (the report passes the median over the whole test split).
        band: the distance, in pixels, that counts as "at" a boundary or nucleus.

    Returns:
        ``HW`` uint8 codes.
    """
    import numpy as np
    from scipy.ndimage import distance_transform_edt
    from skimage.segmentation import find_boundaries

    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"expected an HW label map, got shape {label.shape}")
    regions = np.full(label.shape, FAR, np.uint8)
    fg = label > 0
    if not fg.any():
        return regions
    areas = np.bincount(label[fg].ravel().astype(np.int64))
    if area_threshold is None:
        area_threshold = float(np.median(areas[areas > 0]))
    dist, (iy, ix) = distance_transform_edt(~fg, return_indices=True)
    nearest_area = areas[label[iy, ix]]
    regions[dist <= band] = LARGE
    regions[(dist <= band) & (nearest_area < area_threshold)] = SMALL
    boundary = find_boundaries(label, connectivity=1, mode="thick")
    if boundary.any():
        regions[distance_transform_edt(~boundary) <= band] += NEAR_BOUNDARY
    return regions


def count_errors(regions: Any, gt: Any, pred: Any) -> dict[str, int]:
    """Pixel errors of one semantic mask by where they lie (``regions`` from :func:`error_regions`).

    Returns:
        ``fp``, ``fn`` (pixels), ``errors`` (= fp + fn), and of those errors: ``boundary`` (near a true boundary),
        ``small`` / ``large`` (at a nucleus below / from the area threshold), ``far`` (far background); small + large +
        far = errors.
    """
    import numpy as np

    gt, pred = np.asarray(gt, bool), np.asarray(pred, bool)
    if gt.shape != pred.shape or regions.shape != gt.shape:
        raise ValueError(f"shapes differ: label {gt.shape}, prediction {pred.shape}, regions {regions.shape}")
    err = gt != pred
    hist = np.bincount(regions[err], minlength=N_CODES)
    errors = int(hist.sum())
    fp = int(np.count_nonzero(pred & ~gt))
    return {"fp": fp, "fn": errors - fp, "errors": errors, "boundary": int(hist[NEAR_BOUNDARY::2].sum()),
            "small": int(hist[SMALL:SMALL + 2].sum()), "large": int(hist[LARGE:LARGE + 2].sum()),
            "far": int(hist[FAR:FAR + 2].sum())}


def pixel_error_counts(label: Any, pred: Any, area_threshold: float | None = None,
                       band: float = BAND_PX) -> dict[str, int]:
    """Where the pixel errors of one image's semantic prediction lie (issue 14): :func:`count_errors` of
    :func:`error_regions`.

    Args:
        label: ``HW`` true instance label map (background 0; touching nuclei have different labels).
        pred: ``HW`` predicted semantic mask (non-zero = nucleus).
        area_threshold: area from which a nucleus counts as large (``None``: this image's median nucleus area).
        band: pixels from a boundary / nucleus that count as "at" it (2).

    Returns:
        Counts ``fp``, ``fn``, ``errors``, ``boundary``, ``small``, ``large``, ``far`` (see :func:`count_errors`).
    """
    import numpy as np

    label = np.asarray(label)
    return count_errors(error_regions(label, area_threshold, band), label > 0, np.asarray(pred) > 0)


def nucleus_areas(label: Any) -> Any:
    """Areas (pixels) of the nuclei of an instance label map."""
    import numpy as np

    label = np.asarray(label)
    areas = np.bincount(label[label > 0].ravel().astype(np.int64))
    return areas[areas > 0]


def _label_instances(data_dir: Path, item: dict[str, str]) -> Any:
    from s2l_monai.evaluation import gt_instances

    return gt_instances(_read(data_dir / item["label"]))


def error_locations(work: Path, modality: str, ratio: str, profile: str = "default", band: float = BAND_PX
                    ) -> tuple[list[list[Any]], list[str], dict[str, Any]]:
    """Rows of the "where the pixel errors are" table: per run with saved test masks, the pooled
    :func:`count_errors` over the test split, with the nucleus-area threshold = the median area of all test nuclei.

    Images outside, runs inside: each true label is read and its :func:`error_regions` computed once for all runs.

    Returns:
        Table rows (run, FP, FN, % of errors near a boundary, at small nuclei, at large nuclei, in far background;
        the first row the same shares of all test pixels), notes on the skipped runs, and facts for the text
        (``threshold``, ``n_nuclei``, ``n_images``).
    """
    import numpy as np

    data_dir = work / "data" / modality
    items = json.loads((data_dir / f"datalist_{ratio}.json").read_text())["test"]
    runs, notes = [], []
    for run, m in run_dirs(work, modality, ratio, profile):
        folder, why = semantic_dir(run, items)
        if folder is None:
            notes.append(f"{run_label(m)} (`{run.name}`): {why}")
        else:
            runs.append((run_label(m), folder))
    facts: dict[str, Any] = {"threshold": None, "n_nuclei": 0, "n_images": len(items)}
    if not runs:
        return [], notes, facts
    areas = np.concatenate([nucleus_areas(_label_instances(data_dir, item)) for item in items] or [np.zeros(0)])
    threshold = float(np.median(areas)) if areas.size else None
    facts.update(threshold=threshold, n_nuclei=int(areas.size))
    base = np.zeros(N_CODES, np.int64)
    totals = {name: Counter() for name, _ in runs}
    for item in items:
        label = _label_instances(data_dir, item)
        regions = error_regions(label, threshold, band)
        base += np.bincount(regions.ravel(), minlength=N_CODES)
        gt = label > 0
        for name, folder in runs:
            totals[name].update(count_errors(regions, gt, _read(semantic_path(folder, item)) > 0))

    def pct(part: int, whole: int) -> str:
        return f"{100 * part / whole:.1f}%" if whole else common.DASH

    n_px = int(base.sum())
    rows = [["(all test pixels)", common.DASH, common.DASH, pct(int(base[NEAR_BOUNDARY::2].sum()), n_px),
             pct(int(base[SMALL:SMALL + 2].sum()), n_px), pct(int(base[LARGE:LARGE + 2].sum()), n_px),
             pct(int(base[FAR:FAR + 2].sum()), n_px)]]
    for name, _ in runs:
        c = totals[name]
        rows.append([name, c["fp"], c["fn"], pct(c["boundary"], c["errors"]), pct(c["small"], c["errors"]),
                     pct(c["large"], c["errors"]), pct(c["far"], c["errors"])])
    return rows, notes, facts


def pseudo_label_counts(fg_prob: Any, gt: Any, unlabelled: Any, tau: float) -> Counter:
    """Pixel counts behind :func:`pseudo_label_rates` for one image or volume (arrays of one shape).

    Args:
        fg_prob: averaged foreground probability (float).
        gt: full foreground mask (bool).
        unlabelled: unscribbled pixels (bool).
        tau: consistency threshold (paper Eq. 3): a pseudo-label exists where ``p > tau`` or ``p < 1 - tau``.
    """
    mask = unlabelled & ((fg_prob > tau) | (fg_prob < 1 - tau))
    pred = fg_prob > 0.5
    return Counter({
        "unlabelled": int(unlabelled.sum()), "confident": int(mask.sum()),
        "correct": int((pred[mask] == gt[mask]).sum()),
        "fg": int((mask & pred).sum()), "fg_ok": int((mask & pred & gt).sum()),
        "bg": int((mask & ~pred).sum()), "bg_ok": int((mask & ~pred & ~gt).sum()),
    })


def pseudo_label_rates(c: Counter) -> dict[str, float]:
    """Coverage, accuracy, foreground / background precision and foreground share from summed counts."""
    return {"coverage": c["confident"] / max(c["unlabelled"], 1), "accuracy": c["correct"] / max(c["confident"], 1),
            "fg_precision": c["fg_ok"] / max(c["fg"], 1), "bg_precision": c["bg_ok"] / max(c["bg"], 1),
            "fg_share": c["fg"] / max(c["confident"], 1)}


def pseudo_label_quality(ema_dir: Path, data_dir: Path, items: Sequence[dict[str, str]], tau: float,
                         unlabelled: int = 255) -> dict[str, float]:
    """Coverage and accuracy (vs the full masks) of the pseudo-labels the final EMA store gives at ``tau``."""
    from s2l_monai.data.datalist import item_id
    from s2l_monai.ensemble import EMAStore

    store = EMAStore(ema_dir)
    total: Counter = Counter()
    for item in items:
        prob = store.probabilities(item_id(item["image"]))
        if prob is not None:
            gt = _read(data_dir / item["label"]) > 0
            unl = _read(data_dir / item["scribble"]) == unlabelled
            total += pseudo_label_counts(prob[1], gt, unl, tau)
    return pseudo_label_rates(total)


def scribble_balance(data_dir: Path, ratios: Sequence[str] = ("10", "30", "50", "100")) -> list[list[Any]]:
    """Per ratio: scribbled pixels (fg, bg), fg share of them, scribbled share of all pixels, true fg share, and the
    importance weights that correct the imbalance (:mod:`s2l_monai.data.balance`, also ``s2l balance``).

    Counts over the training items of ``datalist_<ratio>.json`` (scribble values from its ``scribble_values``).
    """
    from s2l_monai.data.balance import scribble_class_balance, suggested_class_weights

    rows = []
    for ratio in ratios:
        path = data_dir / f"datalist_{ratio}.json"
        if not path.is_file():
            continue
        c = scribble_class_balance(path)
        weights = suggested_class_weights(c.scribble_foreground_share, c.label_foreground_share)
        rows.append([f"{ratio}%", c.scribbled_foreground, c.scribbled_background,
                     common.fmt(c.scribble_foreground_share, 3), common.fmt(c.scribbled_share, 4),
                     common.fmt(c.label_foreground_share, 3), f"[{weights[0]:.2f}, 1]"])
    return rows


def prior_row(label: str, prior: dict[str, Any], true_fg_share: float | None) -> list[Any]:
    """One row of the estimated-prior table: run, items read, scribble fg share, estimated and true image fg share,
    the class weights the run used."""
    weights = prior.get("class_weights")
    return [label, prior.get("items", common.DASH), common.fmt(prior.get("scribble_foreground_share"), 3),
            common.fmt(prior.get("image_foreground_share"), 3), common.fmt(true_fg_share, 3),
            common.DASH if not isinstance(weights, list) else "[" + ", ".join(f"{w:g}" for w in weights) + "]"]


def _true_fg_share(data_dir: Path, datalist_name: str) -> float | None:
    from s2l_monai.data.balance import scribble_class_balance

    path = data_dir / datalist_name
    try:
        return scribble_class_balance(path).label_foreground_share if path.is_file() else None
    except (OSError, ValueError, KeyError):
        return None


def analyse(work: Path, modality: str, ratio: str, profile: str = "default"
            ) -> tuple[list[list[Any]], list[list[Any]], list[list[Any]]]:
    """Rows of the three per-run tables (test errors, EMA pseudo-labels, estimated class prior) for the runs of
    ``modality`` at ``ratio`` (and that modality's Full runs)."""
    data_dir = work / "data" / modality
    datalist = json.loads((data_dir / f"datalist_{ratio}.json").read_text())
    test_rows, ema_rows, prior_rows = [], [], []
    true_share: dict[str, float | None] = {}
    for run, m in run_dirs(work, modality, ratio, profile):
        pred_dir, _ = semantic_dir(run, datalist["test"])
        if pred_dir is None:
            continue
        label = run_label(m)
        prior = dsb.read_class_prior(run)
        if prior is not None:
            name = f"datalist_{m['ratio']}.json"
            if name not in true_share:
                true_share[name] = _true_fg_share(data_dir, name)
            prior_rows.append(prior_row(label, prior, true_share[name]))
        e = test_errors(pred_dir, data_dir, datalist["test"])
        test_rows.append([label, common.fmt(e["precision"], 3), common.fmt(e["recall"], 3),
                          common.fmt(e["area_ratio"], 3), common.fmt(e["iou"], 3),
                          f"{common.fmt(e['iou_256'], 3)} (n={e['n_256']})"])
        meta_path = run / "train_meta.json"
        overrides = json.loads(meta_path.read_text()).get("overrides", {}) if meta_path.is_file() else {}
        ema_dir = run / "train" / "ema"
        if m["method"] in ("s2l", "pseudo") and ema_dir.is_dir():
            tau = float(overrides.get("tau", 0.8))
            q = pseudo_label_quality(ema_dir, data_dir, datalist["training"], tau)
            ema_rows.append([label, tau, common.fmt(q["coverage"], 3), common.fmt(q["accuracy"], 4),
                             common.fmt(q["fg_precision"], 3), common.fmt(q["bg_precision"], 4),
                             common.fmt(q["fg_share"], 3)])
    return test_rows, ema_rows, prior_rows


def error_section(rows: Sequence[Sequence[Any]], notes: Sequence[str], facts: dict[str, Any]) -> list[str]:
    """Markdown lines of the report's "where the pixel errors are" section (rows and notes of
    :func:`error_locations`)."""
    threshold = facts.get("threshold")
    area = common.DASH if threshold is None else f"{threshold:g} px"
    band = f"{BAND_PX:g}"
    lines = [
        "## Test split: where the pixel errors are",
        "",
        "Errors of the saved semantic masks (connected-component evaluation folder) against the true instance",
        f"labels, pooled over the {facts.get('n_images', 0)} test images. FP / FN = false positive / negative pixels.",
        "The other columns are shares of all errors (FP + FN):",
        "",
        f"- *within {band} px of a boundary*: Euclidean distance <= {band} px to a pixel where the true instance label",
        "  changes (both sides; between a nucleus and the background and between touching nuclei);",
        f"- *small* / *large nuclei*: inside or within {band} px of a nucleus (the nearest one) whose area is below /",
        f"  at least the median area of the test nuclei ({area}, {facts.get('n_nuclei', 0)} nuclei);",
        f"- *far background*: more than {band} px from every nucleus. Small + large + far = 100%; the boundary share",
        "  overlaps them.",
        "",
        "The first row gives the same shares of all test pixels: what errors spread evenly would show. Semantic",
        "errors cannot see touching nuclei merged into one mask; that shows in the instance scores.",
        "",
    ]
    if rows:
        lines += [common.markdown_table(["run", "FP px", "FN px", f"within {band} px of a boundary",
                                         "small nuclei", "large nuclei", "far background"], rows), ""]
    else:
        lines += ["No run with saved semantic test predictions.", ""]
    if notes:
        lines += ["Skipped: " + "; ".join(notes) + ".", ""]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Analyse the runs and write the markdown report."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/s2l_dsb"), help="benchmarks/dsb.py's work folder")
    p.add_argument("--modality", default="fluorescence", choices=sorted(SHORT))
    p.add_argument("--ratio", default="30", help="scribble ratio tag of the runs (10, 30, 50, 100)")
    p.add_argument("--profile", default="default", choices=sorted(dsb.PROFILES),
                   help="benchmarks/dsb.py profile whose run folders to read (default: default)")
    p.add_argument("--out", type=Path, default=None,
                   help="report (default results/dsb_analysis.md for fluorescence at 30%% and the default "
                        "profile, else results/dsb_analysis_<modality>_<ratio>[_<profile>].md)")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = DEFAULT_OUT.with_name(dsb.analysis_name(args.modality, [args.profile], args.ratio))
    if not dsb.runs_dir(args.work, args.profile).is_dir():
        print(f"dsb_analysis.py: no runs under {args.work}; run benchmarks/dsb.py first", file=sys.stderr)
        return 2
    start = time.perf_counter()
    test_rows, ema_rows, prior_rows = analyse(args.work, args.modality, args.ratio, args.profile)
    error_rows, error_notes, error_facts = error_locations(args.work, args.modality, args.ratio, args.profile)
    balance_rows = scribble_balance(args.work / "data" / args.modality)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cmd = "python benchmarks/dsb_analysis.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        f"# DSB benchmark analysis: {args.modality}, {args.ratio}% scribbles (and Full), profile `{args.profile}`",
        "",
        "Generated by `benchmarks/dsb_analysis.py` from the run folders of `benchmarks/dsb.py`; do not edit by hand.",
        "",
        f"- **Command:** `{cmd}`",
        f"- **Machine:** {common.machine_line(common.machine_info())}",
        f"- **Wall time:** {seconds:.1f} s; **peak RSS:** {peak_mb:.0f} MB; written {common.now_iso()}",
        "",
        "## Test split: pixel errors of the semantic masks (connected-component evaluation folder)",
        "",
        "Precision and recall pooled over all test pixels; area ratio = predicted foreground / true foreground",
        "(above 1: the masks spill over the nuclei); IoU = mean per-image foreground IoU (the benchmark's IoU).",
        "",
        common.markdown_table(["run", "precision", "recall", "area ratio", "IoU", "IoU on 256x256 images"], test_rows),
        "",
        *error_section(error_rows, error_notes, error_facts),
        "## Training images: the pseudo-labels of the final EMA store, against the full masks",
        "",
        "Coverage = share of unscribbled pixels whose averaged foreground probability is above tau or below",
        "1 - tau (the pixels the unlabelled-pixel loss uses); accuracy, foreground and background precision of",
        "those pseudo-labels; fg share = share of them that say foreground.",
        "",
        common.markdown_table(["run", "tau", "coverage", "accuracy", "fg precision", "bg precision", "fg share"],
                              ema_rows) if ema_rows else "No Scribble2Label or Pseudo-label run with an EMA store.",
        "",
        f"## Training images: class balance of the automatic scribbles ({args.modality})",
        "",
        "fg share = foreground pixels / scribbled pixels, the class prior that the scribbled-pixel loss sees;",
        "true fg share = foreground pixels / all pixels in the full masks. Crops are also drawn half around",
        "foreground and half around background scribbles (`RandCropByLabelClassesd`, equal ratios).",
        "class weights = the importance weights [background, foreground] that give the scribbled pixels the",
        "images' class frequencies (odds ratio; `s2l balance` prints them for any datalist).",
        "",
        common.markdown_table(["ratio", "fg scribbled px", "bg scribbled px", "fg share", "scribbled share",
                               "true fg share", "class weights"], balance_rows) if balance_rows else
        "No datalists found.",
        "",
        "## Training images: the class prior each run estimated from its scribbles (`class_weights \"auto\"`)",
        "",
        "From the run's `train/class_prior.json`: items read, foreground share of the scribbled pixels, the image",
        "foreground share estimated from the scribbles alone (per-image intensity threshold), the true share in",
        "the full masks of the same datalist, and the class weights [background, foreground] the run trained with.",
        "",
        common.markdown_table(["run", "items", "scribble fg share", "estimated fg share", "true fg share",
                               "class weights"], prior_rows) if prior_rows else
        "No run estimated its class weights (no `train/class_prior.json`).",
        "",
    ]
    common.write_text_atomic(args.out, "\n".join(lines))
    print(f"[dsb_analysis] wrote {args.out} ({len(test_rows)} runs, {seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
