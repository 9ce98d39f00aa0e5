"""Why an ISBI 2012 run scored what it did: pixel errors on the test slices and quality of the EMA pseudo-labels.

Reads the run folders that ``benchmarks/em.py`` leaves in its work folder (``runs_<profile>/<run>/eval_connected/
predictions``, ``.../train/ema`` and ``.../train/class_prior.json``; every profile of ``em.py``, rows of profiles
other than ``default`` labelled with the profile) with the prepared data's full label volumes, and writes
``benchmarks/results/em_analysis.md``:

1. per run, on the 5 test slices: pooled pixel precision and recall of the semantic volume (foreground = cell
   interior), the predicted foreground over the true one (> 1: the masks spill over the membranes), mean per-slice
   IoU (the benchmark's IoU);
2. per run with an EMA store (Scribble2Label; pCE-only and Full run no ensembles), on the 20 training slices: what
   the final store hands to the unlabelled-pixel loss (coverage = share of unscribbled pixels whose averaged
   probability passes tau; accuracy and foreground / background precision of those pseudo-labels against the full
   labels), with the EMA weight the run used (from its log's schedule line);
3. the class prior each run estimated from its scribbles (``class_weights "auto"``) against the true foreground
   share of the training slices;
4. the class balance of the 10% scribbles against the full labels.

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
    from benchmarks import common, dsb, dsb_analysis, em
except ImportError:  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import common, dsb, dsb_analysis, em

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "em_analysis.md"
RUN_RE = re.compile(r"^isbi2012_(?P<method>s2l|pce|full)_s(?P<seed>\d+)$")
ALPHA_RE = re.compile(r"EMA alpha (?P<alpha>[0-9.]+)")
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


def ema_alpha_of(run: Path, overrides: dict[str, Any]) -> float | None:
    """The EMA weight a run trained with: the last ``EMA alpha`` of the schedule line in its log (what the trainer
    derived), else an ``ema_alpha`` override, else ``None``."""
    try:
        found = ALPHA_RE.findall((run / "log.txt").read_text(errors="replace"))
    except OSError:
        found = []
    if found:
        return float(found[-1])
    value = overrides.get("ema_alpha")
    return float(value) if isinstance(value, (int, float)) else None


def run_folders(work: Path) -> list[tuple[str, Path]]:
    """``(profile, run folder)`` of every finished-looking run under ``work/runs_<profile>`` (``em.PROFILES``)."""
    return [(profile, run) for profile in em.PROFILES if em.runs_dir(work, profile).is_dir()
            for run in sorted(em.runs_dir(work, profile).iterdir()) if RUN_RE.match(run.name)]


def analyse(work: Path) -> tuple[list[list[Any]], list[list[Any]], list[list[Any]], list[list[Any]]]:
    """Rows of the four tables (test errors, EMA stores, estimated class prior, scribble balance) for every run
    under ``work/runs_<profile>``."""
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
    test_rows, ema_rows, prior_rows = [], [], []
    for profile, run in run_folders(work):
        m = RUN_RE.match(run.name)
        assert m is not None
        label = f"{m['method']} (seed {m['seed']})" + ("" if profile == "default" else f", `{profile}`")
        sem = run / "eval_connected" / "predictions" / "test_semantic.tif"
        if not sem.is_file():
            continue
        e = test_errors(_volume(sem) > 0, gt_test)
        test_rows.append([label, common.fmt(e["precision"], 3), common.fmt(e["recall"], 3),
                          common.fmt(e["area_ratio"], 3), common.fmt(e["iou"], 4)])
        prior = dsb.read_class_prior(run)
        if prior is not None:
            prior_rows.append(dsb_analysis.prior_row(label, prior, float(gt_train.mean())))
        meta = run / "train_meta.json"
        over = json.loads(meta.read_text()).get("overrides", {}) if meta.is_file() else {}
        ema_dir = run / "train" / "ema"
        if ema_dir.is_dir():
            prob = EMAStore(ema_dir).probabilities(item_id(item["image"]))
            if prob is None:
                continue
            tau = float(over.get("tau", 0.8))
            q = pseudo_label_quality(prob[1], gt_train, unlabelled, tau)
            ema_rows.append([label, tau, common.fmt(ema_alpha_of(run, over), 3), common.fmt(q["coverage"], 3),
                             common.fmt(q["accuracy"], 4), common.fmt(q["fg_precision"], 4),
                             common.fmt(q["bg_precision"], 4), common.fmt(q["fg_share"], 3)])
    fg, bg = int((scribble == values["foreground"]).sum()), int((scribble == values["background"]).sum())
    balance = [[fg, bg, common.fmt(fg / max(fg + bg, 1), 3), common.fmt((fg + bg) / scribble.size, 4),
                common.fmt(float(gt_train.mean()), 3)]]
    return test_rows, ema_rows, prior_rows, balance


def main(argv: Sequence[str] | None = None) -> int:
    """Analyse the runs and write the markdown report."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/s2l_em"), help="benchmarks/em.py's work folder")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if not run_folders(args.work) or not (args.work / "data" / "datalist_10.json").is_file():
        print(f"em_analysis.py: no runs or data under {args.work}; run benchmarks/em.py first", file=sys.stderr)
        return 2
    start = time.perf_counter()
    test_rows, ema_rows, prior_rows, balance = analyse(args.work)
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
        "The pseudo-labels the unlabelled-pixel loss trained on at the end of each Scribble2Label run (pCE-only and",
        "Full run no ensembles, so they have no store). Coverage = share of unscribbled pixels whose averaged",
        "probability is above tau or below 1 - tau; alpha = the EMA weight of the newest prediction the run used (the",
        "schedule line of its log).",
        "",
        common.markdown_table(["run", "tau", "alpha", "coverage", "accuracy", "fg precision", "bg precision",
                               "fg share"], ema_rows) if ema_rows else "No run with an EMA store.",
        "",
        "## Training slices: the class prior each run estimated from its scribbles (`class_weights \"auto\"`)",
        "",
        "From the run's `train/class_prior.json`: items (slices) read, foreground share of the scribbled pixels, the",
        "image foreground share estimated from the scribbles alone (per-slice intensity threshold), the true share in",
        "the full labels of the training slices, and the class weights [background, foreground] the run trained with.",
        "",
        common.markdown_table(["run", "items", "scribble fg share", "estimated fg share", "true fg share",
                               "class weights"], prior_rows) if prior_rows else
        "No run estimated its class weights (no `train/class_prior.json`).",
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
