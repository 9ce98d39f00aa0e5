"""Measure README command 1: the default training on the built-in synthetic set, then evaluate it.

    python benchmarks/default_run.py [--work /tmp/s2l_default] [--out benchmarks/results/default_run.md]

Writes a markdown result with the command, the machine, wall time, peak memory (whole process tree), train
patches per second of the default network, the share of time spent in EMA ensembles, the loss and Omega_g
coverage per epoch, and the test-split metrics of the trained model next to an Otsu threshold.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import (  # noqa: E402
    git_commit,
    machine_info,
    machine_line,
    markdown_table,
    now_iso,
    run_measured,
    write_text_atomic,
)

#: ``s2l_monai.handlers.EpochSummary``'s line: "epoch 3/12 in 20.1 s, step 150/600: loss 0.412 (L_sp 0.301, L_up
#: 0.222); Omega_g 41.0% of unscribbled pixels; last ensemble 2.1 s"
EPOCH_LINE = re.compile(r"s2l - INFO - epoch (\d+)/\d+ in ([\d.]+) s, step \d+(?:/\d+)?: (.*)$")
_TERMS = {"train_loss": r"loss ([-\d.eE+]+)", "loss_sp": r"L_sp ([-\d.eE+]+)", "loss_up": r"L_up ([-\d.eE+]+)",
          "omega_g": r"Omega_g ([\d.]+)%"}
ENSEMBLE_LINE = re.compile(r"Epoch (\d+), step (\d+): ensemble of (\d+) items in ([\d.]+) s; ([\d.]+)% of unscribbled")
#: ``s2l_monai.handlers.PseudoLabelDriftControl``'s line after each ensemble (``drift_control`` on)
DRIFT_LINE = re.compile(r"step (\d+): foreground ([\d.]+)% of the pseudo-labelled pixels \(reference ([\d.]+)%\), "
                        r"L_up background weight ([\d.]+)")
SCHEDULE_LINE = re.compile(r"ScheduleHandler - INFO - (schedule: .*)$", re.M)
PRIOR_LINE = re.compile(r"s2l_monai.prior - INFO - (class prior .*)$", re.M)
START_LINE = re.compile(r"s2l_monai.pretrained - INFO - (pretrained_weights.*)$", re.M)
THRESHOLD_LINE = re.compile(r"s2l - INFO - (foreground threshold [\d.]+: the outlines.*)$", re.M)


def parse_ensembles(text: str) -> list[dict[str, float]]:
    """One dict per ensemble logged by ``EMAEnsembleHandler``: epoch, step, items, seconds, coverage (share)."""
    return [{"epoch": int(m.group(1)), "step": int(m.group(2)), "items": int(m.group(3)),
             "seconds": float(m.group(4)), "coverage": float(m.group(5)) / 100}
            for m in ENSEMBLE_LINE.finditer(text)]


def parse_drift(text: str) -> dict[int, tuple[float, float]]:
    """Step -> (foreground share of the pseudo-labelled pixels, L_up background weight) from the drift control."""
    return {int(m.group(1)): (float(m.group(2)) / 100, float(m.group(4))) for m in DRIFT_LINE.finditer(text)}


def parse_log(text: str) -> tuple[dict[int, dict[str, float]], dict[int, float]]:
    """Per-epoch metrics and epoch wall times, from the ``EpochSummary`` lines (one per epoch)."""
    metrics: dict[int, dict[str, float]] = {}
    times: dict[int, float] = {}
    for line in text.splitlines():
        m = EPOCH_LINE.search(line)
        if not m:
            continue
        epoch = int(m.group(1))
        times[epoch] = float(m.group(2))
        values = {}
        for key, pattern in _TERMS.items():
            found = re.search(pattern, m.group(3))
            if found:
                values[key] = float(found.group(1)) / (100 if key == "omega_g" else 1)
        metrics[epoch] = values
    return metrics, times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/s2l_default", help="scratch folder (data, run, model)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "default_run.md"))
    args = parser.parse_args(argv)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    py = sys.executable
    train_cmd = [py, "-m", "s2l_monai", "train",
                 "--synthetic_dir", str(work / "data"), "--output_dir", str(work / "run"),
                 "--ckpt_dir", str(work / "models")]
    result = run_measured(train_cmd, cwd=REPO, log_path=work / "train.log")
    if result.returncode != 0:
        print(f"training failed, see {work / 'train.log'}", file=sys.stderr)
        return 1
    log_text = (work / "train.log").read_text(errors="replace")
    metrics, times = parse_log(log_text)
    config = json.loads((REPO / "configs" / "train.json").read_text())
    n_train = len(json.loads((work / "data" / "datalist.json").read_text())["training"])
    ensembles = parse_ensembles(log_text)
    ensemble_total = sum(e["seconds"] for e in ensembles)
    epoch_total = sum(times.values())
    train_only = epoch_total - ensemble_total
    steps = int(config["max_steps"])
    patches_per_second = steps * int(config["batch_size"]) / train_only if train_only > 0 else float("nan")
    schedule = SCHEDULE_LINE.search(log_text)
    prior = PRIOR_LINE.search(log_text)
    start = START_LINE.search(log_text)
    threshold = THRESHOLD_LINE.search(log_text)

    # the run's own last step: the synthetic test split, this model beside Otsu's threshold (s2l_monai.test_report)
    report = json.loads((work / "run" / "test_evaluation" / "comparison.json").read_text())
    s2l, otsu = report["model"], report["otsu"]

    info = machine_info()
    ensemble_epochs = {e["epoch"]: e for e in ensembles}
    drift = parse_drift(log_text)
    drift_epochs = {e["epoch"]: drift[e["step"]] for e in ensembles if e["step"] in drift}
    rows = [[e, *(f"{metrics[e].get(k, float('nan')):.4f}" for k in ("train_loss", "loss_sp", "loss_up", "omega_g")),
             f"{ensemble_epochs[e]['coverage']:.4f}" if e in ensemble_epochs else "",
             f"{drift_epochs[e][0]:.4f}" if e in drift_epochs else "",
             f"{drift_epochs[e][1]:.3f}" if e in drift_epochs else "",
             f"{ensemble_epochs[e]['seconds']:.2f}" if e in ensemble_epochs else ""]
            for e in sorted(metrics) if e == 1 or e in ensemble_epochs or e == max(metrics)]
    summary_rows = [[name, *(f"{res.get(k, float('nan')):.4f}" for k in ("iou", "mdice", "dsb", "pq", "aji"))]
                    for name, res in (("Scribble2Label (default run, watershed)", s2l), ("Otsu threshold", otsu))]
    text = "\n".join([
        "# Default training run (README command 1)",
        "",
        f"- command: `s2l train` (= `python -m monai.bundle run training --config_file configs/train.json`, "
        f"passive OpenMP threads; measured by `python benchmarks/default_run.py`, with "
        f"`--synthetic_dir/--output_dir/--ckpt_dir` in {work})",
        f"- date: {now_iso()}, commit {git_commit(REPO)}",
        f"- machine: {machine_line(info)}",
        f"- wall time (synthetic data generation + {steps} steps in {len(times)} epochs + checkpoints + the test "
        f"evaluation it ends with): "
        f"**{result.seconds:.0f} s**",
        f"- peak RSS of the process tree (main process + data-loader workers): **{result.peak_rss_mb:.0f} MB**",
        f"- training patches per second ({'x'.join(map(str, config['roi_size']))}, batch {config['batch_size']}, "
        f"excluding ensembles): **{patches_per_second:.1f}**",
        f"- time in EMA ensembles: **{ensemble_total:.1f} s of {epoch_total:.1f} s of epochs "
        f"({100 * ensemble_total / epoch_total:.1f}%)**, {len(ensembles)} ensembles over {n_train} images",
        f"- {schedule.group(1) if schedule else 'schedule: not logged'}",
        f"- {prior.group(1) if prior else 'class prior: not logged'}",
        f"- {start.group(1).replace(f'{REPO}/', '') if start else 'start (pretrained_weights): not logged'}",
        f"- {threshold.group(1) if threshold else 'foreground threshold: not logged'}",
        "",
        "## Per epoch (first, every epoch with an ensemble (its coverage and time), last)",
        "",
        "pseudo fg = foreground share of the pseudo-labelled pixels; L_up bg weight = the background weight drift "
        "control set after that ensemble (configs/docs: `drift_control`).",
        "",
        markdown_table(["epoch", "train_loss", "loss_sp", "loss_up", "omega_g", "ema_coverage", "pseudo fg",
                        "L_up bg weight", "ensemble s"], rows),
        "",
        f"## Synthetic test split ({s2l.get('n_images', '?')} images)",
        "",
        markdown_table(["method", "IoU", "mDice", "DSB score", "PQ", "AJI"], summary_rows),
        "",
    ])
    write_text_atomic(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
