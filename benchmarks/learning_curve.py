"""Learning curves on DSB-Fluo 30% (issue 14, item 3): does Scribble2Label pull ahead of its baselines with time?

One long training per method (S2L, pCE only, Pseudo-label, Full masks; the default recipe of ``configs/train.json``
with the method's overrides of ``benchmarks/dsb.py``) under a time budget of the largest of ``--minutes``; the
schedule's shares (warm-up, ensembles, EMA memory, learning-rate decay) follow that budget. The network's weights are
saved when the training clock passes each of ``--minutes`` (``snapshot_minutes``, :class:`~s2l_monai.checkpoints.
TimedSnapshots`); each snapshot is calibrated (threshold and boundary refinement, as training does for its final
model) and evaluated on the test split (flip-averaged inference, watershed instances). Writes
``results/learning_curve.json`` (one record per method and time), ``.md`` (table, command, machine, wall time, peak
memory) and ``.svg`` (IoU and DSB score against minutes, Otsu as a dashed line). Resumable: a method whose snapshots
are all recorded is skipped.

    python benchmarks/learning_curve.py                                  # 5, 10, 20, 40, 90 min x 4 methods (~6 h)
    python benchmarks/learning_curve.py --methods s2l pce --minutes 5 10 20 40
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import dsb  # noqa: E402
from benchmarks.common import (  # noqa: E402
    load_records,
    machine_info,
    machine_line,
    markdown_table,
    now_iso,
    run_measured,
    svg_panel,
    write_json_atomic,
    write_text_atomic,
)

METHODS = ("s2l", "pce", "pseudo", "full")
NAMES = {"s2l": "Scribble2Label", "pce": "pCE only", "pseudo": "Pseudo-label", "full": "Full masks", "otsu": "Otsu"}
COLOURS = {"s2l": "#d62728", "pce": "#1f77b4", "pseudo": "#2ca02c", "full": "#000000", "otsu": "#7f7f7f"}


def run_spec(method: str, seed: int) -> dsb.RunSpec:
    return dsb.RunSpec("fluorescence", None if method == "full" else 0.3, method, seed)


def train_method(method: str, seed: int, minutes: list[float], dataset_dir: Path, run_dir: Path) -> dict[str, Any]:
    """Train one method for ``max(minutes)`` minutes with snapshots; returns wall time and peak memory."""
    cmd = dsb.train_command(run_spec(method, seed), "default", dataset_dir, run_dir)
    cmd += ["--max_steps", "100000000", "--max_train_seconds", str(max(minutes) * 60),
            "--snapshot_minutes", json.dumps(minutes), "--keep_checkpoints", "1"]
    result = run_measured(cmd, cwd=REPO, log_path=run_dir / "train.log")
    if result.returncode != 0:
        raise RuntimeError(f"training {method} failed; see {run_dir / 'train.log'}")
    return {"train_seconds": round(result.seconds, 1), "peak_rss_mb": result.peak_rss_mb}


def evaluate(method: str, seed: int, dataset_dir: Path, ckpt: Path, out_dir: Path) -> dict[str, Any]:
    """Test scores of one snapshot, read as the headline reads a finished training: the snapshot is calibrated
    first (``s2l calibrate`` with the recipe's boundary refinement, as training does for its final model), so the
    evaluation applies the calibrated threshold and the refinement."""
    run = run_spec(method, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    threshold, refine_weight = dsb.calibrate_for_evaluation(run, "default", dataset_dir, ckpt,
                                                            out_dir / "calibrate.log")
    cmd = dsb.eval_command(run, "default", dataset_dir, ckpt, out_dir, "watershed")
    result = run_measured(cmd, cwd=REPO, log_path=out_dir / "eval.log")
    if result.returncode != 0:
        raise RuntimeError(f"evaluation failed; see {out_dir / 'eval.log'}")
    summary = json.loads((out_dir / "summary.json").read_text())
    return {**{k: summary.get(k) for k in ("iou", "dsb", "mdice", "pq", "aji")},
            "foreground_threshold": threshold, "refine_weight": refine_weight}


def _reading(record: dict[str, Any]) -> str:
    """How a snapshot's probabilities were read: its threshold, ``+CRF`` with the boundary refinement."""
    threshold = record.get("foreground_threshold")
    if threshold is None:
        return "–"
    return f"{threshold:g}" + (" +CRF" if record.get("refine_weight") else "")


def svg_plot(records: list[dict[str, Any]], otsu: dict[str, Any] | None) -> str:
    """Two panels (IoU, DSB score) against minutes of training, one polyline per method, Otsu dashed."""
    width, height, pad = 420, 300, 50
    panels = []
    times = sorted({r["minutes"] for r in records}) or [1.0]
    for index, (key, title) in enumerate((("iou", "foreground IoU"), ("dsb", "DSB score (watershed)"))):
        values = [r[key] for r in records if r.get(key) is not None] + ([otsu[key]] if otsu else [])
        lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
        lo, hi = lo - 0.01, hi + 0.01
        reference = (otsu[key], COLOURS["otsu"]) if otsu and otsu.get(key) is not None else None
        parts, px, py = svg_panel(index * (width + 20), title, "minutes of training", (times[0], times[-1]),
                                  (lo, hi), [(m, f"{m:g}") for m in times], reference, width, height, pad)
        for method in METHODS:
            points = sorted((r["minutes"], r[key]) for r in records if r["method"] == method and r.get(key) is not None)
            if points:
                coords = " ".join(f"{px(t):.1f},{py(v):.1f}" for t, v in points)
                parts.append(f'<polyline points="{coords}" fill="none" stroke="{COLOURS[method]}" stroke-width="2"/>')
        panels += parts
    legend = [f'<text x="{60 + 110 * i}" y="{height + 15}" font-size="12" fill="{COLOURS[m]}">{NAMES[m]}</text>'
              for i, m in enumerate((*METHODS, "otsu"))]
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * width + 20}" height="{height + 25}">'
            + "".join(panels + legend) + "</svg>\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zip", type=Path, default=dsb.DEFAULT_ZIP)
    p.add_argument("--work", type=Path, default=Path("/tmp/s2l_dsb"), help="data and run folder (shared with dsb.py)")
    p.add_argument("--minutes", type=float, nargs="+", default=[5, 10, 20, 40, 90])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="only the first N images of the archive (smoke tests)")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "learning_curve.json")
    args = p.parse_args(argv)
    minutes = sorted(float(m) for m in args.minutes)
    start = time.perf_counter()
    data_dir = args.work / "data"
    dsb.ensure_data(args.zip, data_dir, ["fluorescence"], args.limit, 2)
    dataset_dir = data_dir / "fluorescence"
    records = [r for r in load_records(args.results) if r.get("seed") == args.seed]
    peak = max([r.get("peak_rss_mb") or 0 for r in records] + [0])
    for method in args.methods:
        done = {r["minutes"] for r in records if r["method"] == method}
        if set(minutes) <= done:
            print(f"[curve] {method}: all snapshots recorded, skipped", flush=True)
            continue
        run_dir = args.work / "curves" / f"{method}_s{args.seed}"
        print(f"[curve] {method}: training {max(minutes):g} min with snapshots at {minutes}", flush=True)
        info = train_method(method, args.seed, minutes, dataset_dir, run_dir)
        peak = max(peak, info["peak_rss_mb"] or 0)
        snaps = json.loads((run_dir / "ckpt" / "snapshots" / "snapshots.json").read_text())
        for snap in snaps:
            ckpt = run_dir / "ckpt" / "snapshots" / f"model_{snap['minutes']:g}min.pt"
            scores = evaluate(method, args.seed, dataset_dir, ckpt, run_dir / f"eval_{snap['minutes']:g}min")
            record = {"method": method, "seed": args.seed, "budget_minutes": max(minutes), "minutes": snap["minutes"],
                      "seconds": snap["seconds"], "step": snap["step"], **scores, **info, "date": now_iso()}
            records = [r for r in records if not (r["method"] == method and r["minutes"] == snap["minutes"])]
            records.append(record)
            print(f"[curve] {method} at {snap['minutes']:g} min (step {snap['step']}): IoU {scores['iou']:.4f}, "
                  f"DSB {scores['dsb']:.4f}", flush=True)
        write_json_atomic(args.results, records)
    otsu_dir = args.work / "curves" / "otsu"
    run_measured(dsb.otsu_command(dataset_dir, "datalist_30.json", otsu_dir, "watershed"), cwd=REPO,
                 log_path=otsu_dir / "otsu.log")
    otsu_file = otsu_dir / "summary.json"
    otsu_summary = json.loads(otsu_file.read_text()) if otsu_file.is_file() else None
    write_json_atomic(args.results, records)
    rows = [[NAMES[r["method"]], f"{r['budget_minutes']:g}", f"{r['minutes']:g}", str(r["step"]),
             _reading(r), f"{r['iou']:.4f}", f"{r['dsb']:.4f}", f"{r['mdice']:.4f}"]
            for r in sorted(records, key=lambda r: (METHODS.index(r["method"]), r["minutes"]))]
    if otsu_summary:
        rows.append(["Otsu (no learning)", "–", "–", "–", "–", f"{otsu_summary['iou']:.4f}",
                     f"{otsu_summary['dsb']:.4f}", f"{otsu_summary['mdice']:.4f}"])
    svg = args.results.with_suffix(".svg")
    write_text_atomic(svg, svg_plot(records, otsu_summary))
    text = "\n".join([
        "# Learning curves: DSB-Fluo 30%, test split (issue 14, item 3)",
        "",
        f"Command: `python benchmarks/learning_curve.py --methods {' '.join(args.methods)} --minutes "
        f"{' '.join(f'{m:g}' for m in minutes)}`  ",
        f"Machine: {machine_line(machine_info())}  ",
        f"Date: {now_iso()}; wall time of this invocation {(time.perf_counter() - start) / 3600:.2f} h; peak RSS of a "
        f"training {peak:.0f} MB",
        "",
        "One training per method with a time budget (`budget`, minutes: the largest time of the invocation that made",
        "the record; the default recipe's shares follow it); the weights saved when the training clock (ensembles",
        "included) passed each time, calibrated as training calibrates its final model (`thr.`: the foreground",
        "threshold, `+CRF` where the boundary refinement is on) and evaluated on the test split (flip-averaged",
        "inference, watershed instances).",
        f"Plot: [{svg.name}]({svg.name}).",
        "",
        markdown_table(["method", "budget", "minutes", "step", "thr.", "IoU", "DSB score", "mDice"], rows),
        "",
    ])
    write_text_atomic(args.results.with_suffix(".md"), text)
    print(f"[curve] wrote {args.results.with_suffix('.md')} and {svg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
