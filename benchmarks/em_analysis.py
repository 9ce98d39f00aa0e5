"""Why an ISBI 2012 run scored what it did: pixel errors on the test slices and quality of the EMA pseudo-labels.

Reads the run folders that ``benchmarks/em.py`` leaves in its work folder (``runs/<run>/eval_connected/predictions``
and ``runs/<run>/train/ema``; ``runs_<profile>/`` for its other profiles, rows labelled with the profile) with the
prepared data's full label volumes, and writes
``benchmarks/results/em_analysis.md``:

1. per run, on the 5 test slices: pooled pixel precision and recall of the semantic volume (foreground = cell
   interior), the predicted foreground over the true one (> 1: the masks spill over the membranes), mean per-slice
   IoU (the benchmark's IoU);
2. per Scribble2Label run, on the 20 training slices: what the final EMA store hands to the unlabelled-pixel loss
   (coverage = share of unscribbled pixels whose averaged probability passes tau; accuracy and foreground /
   background precision of those pseudo-labels against the full labels), and the same for the pCE-only model's
   OWN prediction at the end of training, read from its EMA store (pCE runs ensembles too, with lambda_up = 0),
   so the two can be compared pixel for pixel;
3. the class balance of the 10% scribbles against the full labels.

The full labels are used for diagnosis only; training never sees them (except in the Full baseline).

Usage::

    .venv/bin/python benchmarks/em_analysis.py --work /tmp/s2l_em
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

try:
    from benchmarks import common, dsb_analysis, em
except ImportError:  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import common, dsb_analysis, em

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "em_analysis.md"
RUN_RE = re.compile(r"^isbi2012_(?P<method>s2l|pce|full)_s(?P<seed>\d+)$")
FOREGROUND = 255  # ISBI 2012 labels: 255 = cell interior, 0 = membrane


def _volume(path: Path):
    import tifffile

    return tifffile.imread(path)


def test_errors(pred: Any, gt: Any) -> dict[str, float]:
    """Pooled precision / recall, area ratio and mean per-slice IoU of boolean ``DHW`` volumes."""
    import numpy as np

    tp, fp, fn = int((pred & gt).sum()), int((pred & ~gt).sum()), int((~pred & gt).sum())
    ious = [float((p & g).sum() / max((p | g).sum(), 1)) for p, g in zip(pred, gt)]
    return {"precision": tp / max(tp + fp, 1), "recall": tp / max(tp + fn, 1),
            "area_ratio": (tp + fp) / max(tp + fn, 1), "iou": float(np.mean(ious))}


def pseudo_label_quality(fg_prob: Any, gt: Any, unlabelled: Any, tau: float) -> dict[str, float]:
    """Coverage and accuracy of the pseudo-labels ``fg_prob > tau`` / ``< 1 - tau`` on the unlabelled pixels.

    Args:
        fg_prob: averaged foreground probability, ``DHW`` float.
        gt: full foreground mask, ``DHW`` bool.
        unlabelled: unscribbled pixels, ``DHW`` bool.
        tau: consistency threshold (paper Eq. 3).
    """
    return dsb_analysis.pseudo_label_rates(dsb_analysis.pseudo_label_counts(fg_prob, gt, unlabelled, tau))


def analyse(work: Path) -> tuple[list[list[Any]], list[list[Any]], list[list[Any]]]:
    """Rows of the three tables for every finished run under ``work/runs`` and ``work/runs_<profile>``."""
    from s2l_monai.data.datalist import item_id
    from s2l_monai.ensemble import EMAStore

    data = work / "data"
    datalist = json.loads((data / "datalist_10.json").read_text())
    values = datalist.get("scribble_values", {"background": 0, "foreground": 1, "unlabelled": 255})
    item = datalist["training"][0]
    gt_test = _volume(data / datalist["test"][0]["label"]) == FOREGROUND
    gt_train = _volume(data / item["label"]) == FOREGROUND
    scribble = _volume(data / item["scribble"])
    unlabelled = scribble == values["unlabelled"]
    test_rows, ema_rows = [], []
    runs = [(profile, run) for profile in em.PROFILES if em.runs_dir(work, profile).is_dir()
            for run in sorted(em.runs_dir(work, profile).iterdir()) if RUN_RE.match(run.name)]
    for profile, run in runs:
        m = RUN_RE.match(run.name)
        label = f"{m['method']} (seed {m['seed']})" + ("" if profile == "cpu" else f", `{profile}`")
        sem = run / "eval_connected" / "predictions" / "test_semantic.tif"
        if not sem.is_file():
            continue
        e = test_errors(_volume(sem) > 0, gt_test)
        test_rows.append([label, common.fmt(e["precision"], 3), common.fmt(e["recall"], 3),
                          common.fmt(e["area_ratio"], 3), common.fmt(e["iou"], 4)])
        ema_dir = run / "train" / "ema"
        if m["method"] in ("s2l", "pce") and ema_dir.is_dir():
            meta = run / "train_meta.json"
            over = json.loads(meta.read_text()).get("overrides", {}) if meta.is_file() else {}
            tau, alpha = float(over.get("tau", 0.8)), float(over.get("ema_alpha", 0.2))
            prob = EMAStore(ema_dir).probabilities(item_id(item["image"]))
            if prob is None:
                continue
            q = pseudo_label_quality(prob[1], gt_train, unlabelled, tau)
            ema_rows.append([label, tau, alpha, common.fmt(q["coverage"], 3), common.fmt(q["accuracy"], 4),
                             common.fmt(q["fg_precision"], 4), common.fmt(q["bg_precision"], 4),
                             common.fmt(q["fg_share"], 3)])
    fg, bg = int((scribble == values["foreground"]).sum()), int((scribble == values["background"]).sum())
    balance = [[fg, bg, common.fmt(fg / max(fg + bg, 1), 3), common.fmt((fg + bg) / scribble.size, 4),
                common.fmt(float(gt_train.mean()), 3)]]
    return test_rows, ema_rows, balance


def main(argv: Sequence[str] | None = None) -> int:
    """Analyse the runs and write the markdown report."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/s2l_em"), help="benchmarks/em.py's work folder")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if not (args.work / "runs").is_dir() or not (args.work / "data" / "datalist_10.json").is_file():
        print(f"em_analysis.py: no runs or data under {args.work}; run benchmarks/em.py first", file=sys.stderr)
        return 2
    start = time.perf_counter()
    test_rows, ema_rows, balance = analyse(args.work)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cmd = "python benchmarks/em_analysis.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        "# ISBI 2012 benchmark analysis",
        "",
        "Generated by `benchmarks/em_analysis.py` from the run folders of `benchmarks/em.py`; do not edit by hand.",
        "",
        f"- **Command:** `{cmd}`",
        f"- **Machine:** {common.machine_line(common.machine_info())}",
        f"- **Wall time:** {seconds:.1f} s; **peak RSS:** {peak_mb:.0f} MB; written {common.now_iso()}",
        "",
        "## Test slices: pixel errors of the semantic volumes",
        "",
        "Foreground = cell interior (label 255). Precision and recall pooled over the 5 test slices; area ratio =",
        "predicted foreground / true foreground (above 1: the masks spill over the membranes); IoU = mean per slice.",
        "",
        common.markdown_table(["run", "precision", "recall", "area ratio", "IoU"], test_rows),
        "",
        "## Training slices: the final EMA store against the full labels",
        "",
        "For S2L these are the pseudo-labels the unlabelled-pixel loss trains on. pCE-only runs the same ensembles",
        "but with lambda_up = 0, so its store is the averaged prediction of a model that never saw pseudo-labels:",
        "the same figures for it show what the pseudo-labels would have been without self-training. Coverage =",
        "share of unscribbled pixels whose averaged probability is above tau or below 1 - tau.",
        "",
        common.markdown_table(["run", "tau", "alpha", "coverage", "accuracy", "fg precision", "bg precision",
                               "fg share"], ema_rows) if ema_rows else "No run with an EMA store.",
        "",
        "## Training slices: class balance of the 10% scribbles",
        "",
        common.markdown_table(["fg scribbled px", "bg scribbled px", "fg share", "scribbled share",
                               "true fg share"], balance),
        "",
    ]
    common.write_text_atomic(args.out, "\n".join(lines))
    print(f"[em_analysis] wrote {args.out} ({len(test_rows)} runs, {seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
