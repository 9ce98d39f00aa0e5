"""ISBI 2012 (serial-section EM) benchmark of Scribble2Label, trained and evaluated slice by slice (issue 4).

Resumable like ``benchmarks/dsb.py``: every finished run appends one record to ``benchmarks/results/em.json``
(written atomically; the record keys are those of the DSB benchmark, ``dataset`` = ``isbi2012``) and a rerun skips
the (dataset, ratio, method, seed) records already there; ``benchmarks/results/em.md`` is regenerated after every
run.

Data: ``../shared/data/isbi2012/train-volume.tif`` and ``train-labels.tif`` (30x512x512; label 255 = cell interior =
foreground). Fixed slice split: 0-19 train, 20-24 validation, 25-29 test, each written as its own TIFF volume.
Automatic scribbles on 10% (:func:`s2l_monai.data.scribbles.auto_scribbles`, per slice, one seeded generator for
the whole volume, as the paper's EM setting). Methods (overrides of the same ``configs/train.json`` with
``--slice_axis 0``): Scribble2Label, pCE only (``lambda_up 0``), Full (the full masks as scribbles,
``lambda_up 0``), 2 seeds; plus an Otsu line (no learning). Each model is evaluated on the test volume by
``configs/inference.json`` + ``configs/evaluate.json`` with ``--slice_axis 0``: IoU and mDice are means over the
5 test slices (each slice is an image, as in the paper); 3D numbers are in each run's ``eval_*/volume_3d/``.

Profiles: ``cpu`` (the default; at most 10 minutes of training per run on 2 CPU cores; ``results/em.json``) and
``gpu-short`` (a lent GPU machine running the six trainings at once on 256x256 patches; ``results/em_gpu-short.json``).

Examples::

    .venv/bin/python benchmarks/em.py --work /tmp/s2l_em
    .venv/bin/python benchmarks/em.py --work /tmp/s2l_em --list
    .venv/bin/python benchmarks/em.py --work /tmp/s2l_em --only s2l:0 --max-runs 1
    .venv/bin/python benchmarks/em.py --report-only
    python benchmarks/em.py --work /tmp/s2l_em --profile gpu-short --only s2l:0   # one of six parallel calls
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    from benchmarks import common, dsb
except ImportError:  # run as a script: python benchmarks/em.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import common, dsb

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "isbi2012"
DATASET = "isbi2012"
RATIO = 0.1
SPLIT: dict[str, tuple[int, int]] = {"train": (0, 20), "val": (20, 25), "test": (25, 30)}  # [start, stop)

# --------------------------------------------------------------------------------------------------------------
# Profile ``cpu``: each training run must take at most 10 minutes on 2 CPU cores.
# Measured on 2 cores (OMP_WAIT_POLICY=PASSIVE, 2026-11-25), each run alone: one epoch of 20 training slices x
# 16 patches of 128x128 takes 5-9 s (the same run varies by up to 40% with the host's load), one ensemble over
# the 20 slices of 512x512 about 3-4 s. 80 epochs took 548-583 s for S2L / pCE but 618.5 s for Full, and a
# later 72-epoch S2L run 642 s, so epochs alone cannot keep a run inside the budget: the profile is 72 epochs
# with a 570 s training budget (``max_train_seconds``; the trainer stops at the last epoch that fits, and the
# record holds the epochs trained). Warm-up is 25 epochs (5 ensembles before L_up starts).
# --------------------------------------------------------------------------------------------------------------
CPU_PROFILE: dict[str, Any] = {
    "max_epochs": 72,
    "max_train_seconds": 570,
    "warmup_epochs": 25,
    "ema_every": 5,
    "roi_size": [128, 128],
    "num_samples": 16,
    "batch_size": 16,
    "learning_rate": 3e-3,
    "num_workers": 1,
    "ensemble_whole_image": False,  # as measured: sliding-window ensembles (see s2l_monai/inferers.py)
}
#: ``gpu-short``: for a lent GPU machine (one H100/H200, 16 CPU cores, a 15-minute lease): the six trainings run at
#: once, sharing the GPU, with 2 loader workers each (`.gpu`-style driver, see benchmarks/README.md), on 256x256
#: patches. Sized from the DSB GPU record (four runs sharing an H200 each drew ~100 256x256 patches/s, bound by
#: the loaders, not the GPU): 100 epochs of 20 slices x 8 patches is 16,000 patches, about 2.8x the pixels the
#: ``cpu`` profile trains on; ``max_train_seconds`` stops a slower host at the last epoch that fits.
GPU_SHORT_PROFILE: dict[str, Any] = {
    "max_epochs": 100,
    "max_train_seconds": 330,
    "warmup_epochs": 30,
    "ema_every": 5,
    "roi_size": [256, 256],
    "num_samples": 8,
    "batch_size": 16,
    "learning_rate": 3e-3,
    "num_workers": 2,
    "ensemble_whole_image": True,
}
#: ``cpu-a05``: ``cpu`` with the EMA weight ``ema_alpha`` 0.5 instead of the paper's 0.2, which changes
#: Scribble2Label only. Why: with an ensemble every 5 epochs and alpha 0.2 the average's mean age is 4 ensembles
#: (20 epochs) of a 72-epoch run, and when L_up starts (epoch 25) the epoch-5 prediction still makes 41% of it
#: (``y_0 = p_5``, weight 0.8^4); with alpha 0.5: mean age 1 ensemble, weight 6%. Chosen on the VALIDATION
#: slices 20-24, seed 0, among three variants (benchmarks/README.md, "EM: the EMA weight"): IoU 0.8728 (``cpu``)
#: -> 0.8780; pCE-only 0.8771.
CPU_A05_PROFILE: dict[str, Any] = {**CPU_PROFILE, "ema_alpha": 0.5}
#: ``cpu-pcw``: ``cpu`` with ``pseudo_class_weights [1.6, 1]``: a membrane (background) pseudo-label counts 1.6 times
#: in L_up. Why: the final ``cpu`` stores of S2L and pCE (seeds 0, 1) hold 82-85% foreground, mean 84%, against
#: 77% in the labels (the thin, uncertain membranes are what the average leaves out, ``results/em_analysis.md``);
#: (0.23 / 0.77) / (0.16 / 0.84) = 1.57 brings those odds back to the labels'. On the validation slices, seed 0, it
#: traded IoU (0.8728 -> 0.8685) for separated cells (mDice 0.493 -> 0.557; pCE-only 0.451): the instance-oriented
#: choice.
CPU_PCW_PROFILE: dict[str, Any] = {**CPU_PROFILE, "pseudo_class_weights": [1.6, 1.0]}
PROFILES: dict[str, dict[str, Any]] = {
    "cpu": CPU_PROFILE, "cpu-a05": CPU_A05_PROFILE, "cpu-pcw": CPU_PCW_PROFILE, "gpu-short": GPU_SHORT_PROFILE,
}
#: Profiles that change Scribble2Label only: they plan Scribble2Label alone and report it beside the pCE-only, Full
#: and Otsu records of the named profile (pCE-only and Full train with lambda_up 0, so the EMA settings never reach
#: their loss; their training is the same command).
BASELINE_PROFILES: dict[str, str] = {"cpu-a05": "cpu", "cpu-pcw": "cpu"}
#: One line per profile for the report.
PROFILE_NOTES: dict[str, str] = {
    "cpu": "2 CPU cores, 128x128 patches",
    "cpu-a05": "`cpu` with `ema_alpha 0.5`, Scribble2Label only; pCE-only, Full and Otsu are the records of `cpu`"
               " (`em.json`), configured identically",
    "cpu-pcw": "`cpu` with `pseudo_class_weights [1.6, 1]` (membrane pseudo-labels up-weighted), Scribble2Label only;"
               " pCE-only, Full and Otsu are the records of `cpu` (`em.json`), configured identically",
    "gpu-short": "one lent GPU shared by the six trainings, 256x256 patches",
}
#: ``--smoke`` (hidden): 1 epoch on a few slices, to check the harness end to end.
SMOKE_OVERRIDES: dict[str, Any] = {"max_epochs": 1, "warmup_epochs": 0, "ema_every": 1, "num_workers": 0}
SMOKE_SPLIT: dict[str, tuple[int, int]] = {"train": (0, 3), "val": (20, 21), "test": (25, 27)}

METHOD_OVERRIDES: dict[str, dict[str, Any]] = {
    "s2l": {},
    "pce": {"lambda_up": 0},
    "full": {"lambda_up": 0},  # full masks as scribbles on every training slice (datalist_full.json)
}
METHOD_LABELS = {"pce": "pCE only", "s2l": "Scribble2Label", "full": "Full", "otsu": "Otsu (no learning)"}
SEEDS = (0, 1)
KEY_FIELDS = dsb.KEY_FIELDS
# Paper (Lee & Jeong, MICCAI 2020, Table 1, EM column), IoU [mDice]; its mDice is the per-image variant.
PAPER_EM: dict[str, tuple[float, float]] = {"pce": (0.9000, 0.9032), "s2l": (0.9208, 0.9167), "full": (0.9298, 0.9149)}
# Anchors measured on this split before this benchmark existed (issue 4): IoU only.
ANCHORS: dict[str, float] = {
    "Otsu": 0.635,
    "random forest on ilastik-style features, 10% scribbles": 0.876,
    "small MONAI U-Net, 5 min of partial cross-entropy, 10% scribbles": 0.870,
}


@dataclass(frozen=True)
class EMRun:
    """One run: method and seed (``ratio`` is 0.1 for scribbles, None for Full and Otsu)."""

    method: str
    seed: int | None

    dataset = DATASET

    @property
    def ratio(self) -> float | None:
        return None if self.method in ("full", "otsu") else RATIO

    @property
    def key(self) -> tuple[Any, ...]:
        return dsb.record_key({"dataset": DATASET, "ratio": self.ratio, "method": self.method, "seed": self.seed})

    @property
    def datalist_name(self) -> str:
        return "datalist_full.json" if self.method == "full" else "datalist_10.json"

    @property
    def run_id(self) -> str:
        return f"{self.method}:{'-' if self.seed is None else self.seed}"

    @property
    def dir_name(self) -> str:
        return f"{DATASET}_{self.method}_{'na' if self.seed is None else f's{self.seed}'}"


def build_plan(profile: str = "cpu", seeds: Sequence[int] = SEEDS) -> list[EMRun]:
    """S2L, pCE, Full for the first seed, the Otsu line, then the three again for each further seed (default 0 and
    1; S2L alone for a profile in ``BASELINE_PROFILES``)."""
    plan = [EMRun(m, seeds[0]) for m in ("s2l", "pce", "full")] + [EMRun("otsu", None)]
    plan += [EMRun(m, seed) for seed in seeds[1:] for m in ("s2l", "pce", "full")]
    return [r for r in plan if r.method == "s2l"] if profile in BASELINE_PROFILES else plan


def select_plan(plan: Sequence[EMRun], only: Sequence[str] | None) -> list[EMRun]:
    """Runs matching ``METHOD:SEED`` patterns (``*`` matches anything, SEED ``-`` for Otsu)."""
    if not only:
        return list(plan)
    pats = [s.split(":") for s in only]
    if any(len(p) != 2 for p in pats):
        raise ValueError(f"--only {list(only)}: expected METHOD:SEED, e.g. s2l:0, full:1, otsu:-")
    out = [r for r in plan if any(all(a in ("*", b) for a, b in zip(p, r.run_id.split(":"))) for p in pats)]
    if not out:
        raise ValueError(f"--only {list(only)} matches no run; see --list")
    return out


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


def prepare_data(src: Path, out: Path, split: dict[str, tuple[int, int]], seed: int = 0) -> Path:
    """Split the ISBI stack into train / val / test TIFF volumes with labels and 10% automatic scribbles.

    Writes ``images/{train,val,test}.tif``, ``labels/*.tif`` (0/255), ``scribbles/train_10.tif`` (0 background,
    1 foreground, 255 unlabelled), ``scribbles/train_full.tif`` (the full mask as 0/1) and ``datalist_10.json`` /
    ``datalist_full.json``. Idempotent: a folder with both datalists is left alone.
    """
    import numpy as np

    from s2l_monai.data.scribbles import auto_scribbles
    from s2l_monai.volumes import VolumeGeometry, open_volume, write_volume

    if (out / "datalist_10.json").is_file() and (out / "datalist_full.json").is_file():
        return out
    image_path, label_path = src / "train-volume.tif", src / "train-labels.tif"
    for p in (image_path, label_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: the ISBI 2012 stacks are expected in {src} (see --data)")
    image, label = open_volume(image_path), open_volume(label_path)
    geometry = image.geometry
    for name, (a, b) in split.items():
        g = VolumeGeometry(**{**geometry.__dict__, "shape": (b - a, *image.shape[1:])})
        img = np.stack([image.slice(0, k) for k in range(a, b)])
        lab = np.stack([label.slice(0, k) for k in range(a, b)])
        write_volume(out / "images" / f"{name}.tif", img, g)
        write_volume(out / "labels" / f"{name}.tif", np.where(lab == 255, 255, 0).astype(np.uint8), g)
        if name == "train":
            rng = np.random.default_rng(seed)
            scribble = np.stack([auto_scribbles(s == 255, RATIO, rng) for s in lab])
            write_volume(out / "scribbles" / "train_10.tif", scribble, g)
            write_volume(out / "scribbles" / "train_full.tif", (lab == 255).astype(np.uint8), g)
    for tag in ("10", "full"):
        datalist = {
            "scribble_values": {"background": 0, "foreground": 1, "unlabelled": 255},
            "training": [{"image": "images/train.tif", "scribble": f"scribbles/train_{tag}.tif",
                          "label": "labels/train.tif"}],
            "validation": [{"image": "images/val.tif", "label": "labels/val.tif"}],
            "test": [{"image": "images/test.tif", "label": "labels/test.tif"}],
        }
        common.write_json_atomic(out / f"datalist_{tag}.json", datalist)
    return out


# --------------------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------------------


def train_overrides(run: EMRun, smoke: bool = False, profile: str = "cpu") -> dict[str, Any]:
    """Profile, method, smoke overrides (later ones win)."""
    over = {**PROFILES[profile], **METHOD_OVERRIDES[run.method]}
    if smoke:
        over.update(SMOKE_OVERRIDES)
    return over


def train_command(run: EMRun, dataset_dir: Path, run_dir: Path, smoke: bool = False,
                  profile: str = "cpu") -> list[str]:
    """``python -m monai.bundle run training --slice_axis 0 ...`` (cwd = repository root)."""
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.json",
        "--slice_axis", "0", "--dataset_dir", str(dataset_dir), "--datalist_name", run.datalist_name,
        "--output_dir", str(run_dir / "train"), "--ckpt_dir", str(run_dir / "ckpt"), "--seed", str(run.seed),
    ]
    for key, value in train_overrides(run, smoke, profile).items():
        cmd += [f"--{key}", dsb._cli_value(value)]
    return cmd


def eval_command(run: EMRun, dataset_dir: Path, ckpt: Path, out_dir: Path, instance_method: str) -> list[str]:
    """Slice-wise evaluation of the test volume."""
    return [
        sys.executable, "-m", "monai.bundle", "run", dsb.eval_run_id(),
        "--config_file", "['configs/inference.json','configs/evaluate.json']", "--slice_axis", "0",
        "--dataset_dir", str(dataset_dir), "--datalist_name", run.datalist_name, "--ckpt_path", str(ckpt),
        "--output_dir", str(out_dir), "--instance_method", instance_method,
    ]


def otsu_evaluate(dataset_dir: Path, out_dir: Path, instance_method: str) -> dict[str, Any]:
    """Otsu per test slice (percentile scaling as the configs; bright = foreground), the network's post-processing,
    the same metrics."""
    import numpy as np
    from skimage.filters import threshold_otsu

    from s2l_monai.evaluation import gt_instances
    from s2l_monai.instances import instances_from_mask
    from s2l_monai.metrics import evaluate_pair, write_reports
    from s2l_monai.volumes import open_volume

    datalist = json.loads((dataset_dir / "datalist_10.json").read_text())
    records = []
    for item in datalist["test"]:
        image, label = open_volume(dataset_dir / item["image"]), open_volume(dataset_dir / item["label"])
        for k in range(image.shape[0]):
            img = image.slice(0, k).astype(np.float32)
            lo, hi = np.percentile(img, (1, 99.8))
            scaled = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)
            # EM: the foreground (cell interior) is the BRIGHT and larger side; otsu_foreground picks the smaller
            # side (nuclei in light microscopy), which here would be the membranes.
            semantic = scaled > threshold_otsu(scaled) if scaled.max() > scaled.min() else np.zeros_like(scaled, bool)
            pred = instances_from_mask(semantic, instance_method, min_size=64)
            gt = gt_instances(label.slice(0, k))
            records.append(evaluate_pair(pred, gt, semantic, name=f"{Path(item['image']).stem}_z{k:04d}"))
    write_reports(records, out_dir)
    return dsb._read_summary(out_dir)


# --------------------------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------------------------


def runs_dir(work: Path, profile: str = "cpu") -> Path:
    """The run folders of a profile: ``work/runs`` for ``cpu`` (what ``em_analysis.py`` reads),
    ``work/runs_<profile>`` otherwise."""
    return work / ("runs" if profile == "cpu" else f"runs_{profile}")


def results_path(profile: str = "cpu") -> Path:
    """``results/em.json`` for the ``cpu`` profile, ``results/em_<profile>.json`` for the others."""
    return RESULTS_DIR / ("em.json" if profile == "cpu" else f"em_{profile}.json")


def execute_run(run: EMRun, data_dir: Path, work: Path, context: dict[str, Any], smoke: bool = False,
                profile: str = "cpu") -> dict:
    """Train (unless Otsu) and evaluate one run; return its record (the DSB benchmark's keys)."""
    run_dir = runs_dir(work, profile) / run.dir_name
    log = run_dir / "log.txt"
    start = time.perf_counter()
    reused, reused_seconds = False, 0.0
    summaries: dict[str, dict[str, Any]] = {}
    if run.method == "otsu":
        run_dir.mkdir(parents=True, exist_ok=True)
        with common.ProcessTreeMonitor(os.getpid(), interval=0.5) as mon:
            t0 = time.perf_counter()
            for method in ("connected", "watershed"):
                summaries[method] = otsu_evaluate(data_dir, run_dir / f"eval_{method}", method)
            seconds = time.perf_counter() - t0
        train = {"train_seconds": 0.0, "peak_rss_mb": round(mon.peak_mb, 1), "images_per_second": None,
                 "command": "benchmarks/em.py otsu_evaluate (in process)", "eval_seconds": round(seconds, 1)}
    else:
        meta_path, ckpt = run_dir / "train_meta.json", run_dir / "ckpt" / "model.pt"
        if meta_path.is_file() and ckpt.is_file():
            train = json.loads(meta_path.read_text())
            reused, reused_seconds = True, float(train.get("train_seconds") or 0.0)
            print(f"[em] {run.run_id}: reusing the finished training in {run_dir}", flush=True)
        else:
            for sub in ("train", "ckpt"):
                shutil.rmtree(run_dir / sub, ignore_errors=True)
            cmd = train_command(run, data_dir, run_dir, smoke, profile)
            print(f"[em] {run.run_id}: training ({dsb._quote(cmd)})", flush=True)
            res = common.run_measured(cmd, REPO_ROOT, log)
            if res.returncode != 0 or not ckpt.is_file():
                raise RuntimeError(f"{run.run_id}: training exited {res.returncode}; see {log}")
            over = train_overrides(run, smoke, profile)
            from s2l_monai.volumes import slice_items

            datalist = json.loads((data_dir / run.datalist_name).read_text())
            items = [{**i, "image": str(data_dir / i["image"]), "scribble": str(data_dir / i["scribble"])}
                     for i in datalist["training"]]
            n_train = len(slice_items(items, 0))  # scribbled training slices
            epochs, iterations = dsb._trained_epochs(run_dir / "ckpt")
            epochs = epochs if epochs is not None else int(over["max_epochs"])
            patches = n_train * int(over["num_samples"]) * epochs
            train = {
                "train_seconds": round(res.seconds, 1), "peak_rss_mb": res.peak_rss_mb,
                "images_per_second": round(patches / res.seconds, 2) if res.seconds > 0 else None,
                "n_train_images": n_train, "epochs": epochs, "iterations": iterations, "patches": patches,
                "overrides": over, "command": dsb._quote(cmd),
            }
            common.write_json_atomic(meta_path, train)
        eval_seconds = 0.0
        for method in ("connected", "watershed"):
            out = run_dir / f"eval_{method}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = eval_command(run, data_dir, ckpt, out, method)
            print(f"[em] {run.run_id}: evaluating ({method})", flush=True)
            res = common.run_measured(cmd, REPO_ROOT, log)
            if res.returncode != 0:
                raise RuntimeError(f"{run.run_id}: evaluation ({method}) exited {res.returncode}; see {log}")
            summaries[method] = dsb._read_summary(out)
            eval_seconds += res.seconds
        train = {**train, "eval_seconds": round(eval_seconds, 1)}
    train["wall_seconds"] = round(time.perf_counter() - start, 1) + (reused_seconds if reused else 0.0)
    return dsb.make_record(run, summaries["connected"], summaries["watershed"], train, context)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------


def _select(records: Sequence[dict[str, Any]], method: str) -> list[dict[str, Any]]:
    return [r for r in records if r.get("dataset") == DATASET and r.get("method") == method]


def main_table(records: Sequence[dict[str, Any]]) -> str:
    """Methods: ours (mean ± std over seeds) beside the paper's EM column."""
    rows = []
    for method in ("pce", "s2l", "full", "otsu"):
        recs = _select(records, method)
        train_s, _, _ = common.mean_std(r.get("train_seconds") for r in recs)
        longest = max((float(r["train_seconds"]) for r in recs if r.get("train_seconds") is not None), default=None)
        epochs = ", ".join(str(r["epochs"]) for r in recs if r.get("epochs") is not None) or common.DASH
        rows.append([METHOD_LABELS[method], dsb.ours_cell(recs), dsb.paper_cell(PAPER_EM.get(method)),
                     common.fmt(train_s, 0), common.fmt(longest, 0), epochs])
    return common.markdown_table(["method", "ISBI 2012 ours, IoU [mDice]", "paper EM", "train s (mean)",
                                  "train s (max)", "epochs trained (per seed)"], rows)


def check_targets(records: Sequence[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """Issue 4's targets: S2L IoU within 0.02 of Full, and above pCE-only (means over seeds)."""
    s, _, ns = common.mean_std(r.get("iou") for r in _select(records, "s2l"))
    f, _, nf = common.mean_std(r.get("iou") for r in _select(records, "full"))
    p, _, np_ = common.mean_std(r.get("iou") for r in _select(records, "pce"))
    out = []
    name = "S2L IoU within 0.02 of Full"
    if s is None or f is None:
        out.append((name, dsb.NOT_MEASURED, f"S2L records: {ns}, Full records: {nf}"))
    else:
        out.append((name, "PASS" if f - s <= 0.02 else "FAIL", f"S2L {s:.4f} (n={ns}) vs Full {f:.4f} (n={nf})"))
    name = "S2L IoU above pCE-only"
    if s is None or p is None:
        out.append((name, dsb.NOT_MEASURED, f"S2L records: {ns}, pCE records: {np_}"))
    else:
        out.append((name, "PASS" if s > p else "FAIL", f"S2L {s:.4f} (n={ns}) vs pCE {p:.4f} (n={np_})"))
    return out


def _profiles(records: Sequence[dict[str, Any]], header: dict[str, Any]) -> list[str]:
    """The profiles of the records (``+smoke`` stripped), else the header's."""
    found = sorted({str(r["profile"]).split("+")[0] for r in records if r.get("profile")})
    return found or [str(header.get("profile", "cpu"))]


def profile_lines(records: Sequence[dict[str, Any]], header: dict[str, Any]) -> list[str]:
    """One report line per profile: what it trains, within which budget."""
    lines = []
    for name in _profiles(records, header):
        prof = PROFILES.get(name)
        if prof is None:
            lines.append(f"Profile `{name}` (not defined in this em.py).")
            continue
        roi = "x".join(str(v) for v in prof["roi_size"])
        n_train = SPLIT["train"][1] - SPLIT["train"][0]
        lines.append(f"Profile `{name}` ({PROFILE_NOTES[name]}): up to {prof['max_epochs']} epochs "
                     f"({prof['warmup_epochs']} of warm-up, an ensemble every {prof['ema_every']}) of {n_train} "
                     f"slices x {prof['num_samples']} patches of {roi}, within a {prof['max_train_seconds']} s "
                     "training budget")
    return lines


def render_report(records: Sequence[dict[str, Any]], header: dict[str, Any],
                  baseline: Sequence[dict[str, Any]] = ()) -> str:
    """The whole ``em.md`` (``em_<profile>.md``); ``baseline``: the other methods' records for a profile in
    ``BASELINE_PROFILES`` (shown in the tables and used by the targets beside this profile's own records)."""
    machines = sorted({common.machine_line(r["machine"]) for r in records if isinstance(r.get("machine"), dict)})
    if not machines and header.get("machine"):
        machines = [common.machine_line(header["machine"])]
    commands = sorted({r["harness_command"] for r in records if r.get("harness_command")}) or (
        [header["command"]] if header.get("command") else [])
    peaks = [r.get("peak_rss_mb") for r in records if isinstance(r.get("peak_rss_mb"), (int, float))]
    total = sum(float(r.get("wall_seconds") or r.get("train_seconds") or 0.0) for r in records)
    own_profiles, n_own = _profiles(records, header), len(records)
    profile = own_profiles[0]
    plan = build_plan(profile)
    done = {dsb.record_key(r) for r in records}
    base_line = []
    if baseline:
        base_name = BASELINE_PROFILES.get(profile, "cpu")
        base_line = [f"pCE only, Full and Otsu below are the records of profile `{base_name}` "
                     f"(`{results_path(base_name).name}`): this profile changes Scribble2Label only."]
        records = [*records, *baseline]
    lines = [
        "# ISBI 2012 (serial-section EM) benchmark: Scribble2Label vs baselines, slice-wise",
        "",
        "Generated by `benchmarks/em.py` from `" + header.get("results_name", "em.json") + "`; do not edit by hand.",
        "",
        "- **Command(s):** " + ("; ".join(f"`{c}`" for c in commands) if commands else common.DASH),
        "- **Machine(s):** " + ("; ".join(machines) if machines else common.DASH),
        f"- **Runs:** {sum(r.key in done for r in plan)} of {len(plan)} planned (seeds "
        f"{', '.join(map(str, SEEDS))}) have a record ({n_own} records in all)",
        f"- **Total wall time** (training + evaluations): {total / 3600:.2f} h",
        f"- **Peak memory** (largest peak RSS of a process tree, MB): {common.fmt(max(peaks) if peaks else None, 0)}",
        f"- **Report written:** {header.get('date', common.now_iso())}",
        "",
        "Split: slices 0-19 train, 20-24 validation, 25-29 test (`train-volume.tif`, foreground = label 255).",
        "Automatic scribbles on 10% (seed 0). Every method is `configs/train.json --slice_axis 0` with overrides;",
        "IoU / mDice are means over the 5 test slices (connected-component instances, the paper's post-processing);",
        "mDice in brackets is the correct pooled one. `–`: no record yet. Paper: Lee & Jeong, MICCAI 2020, Table 1,",
        "EM column.",
        *profile_lines(records, header),
        "(`max_train_seconds`: the trainer stops at the last epoch that fits, so a slow host trains fewer epochs).",
        *base_line,
        *dsb._gpu_note(records, [p for p in own_profiles if p != "cpu"] or ["cpu"]),
        "",
        main_table(records),
        "",
        "Anchors measured on this split (issue 4, IoU): "
        + "; ".join(f"{k} {v:.3f}" for k, v in ANCHORS.items()) + ".",
        "",
        "## All records",
        "",
        dsb.records_table(records),
        "",
        *dsb.record_notes(records),
        "## Targets (issue 4; test slices, mean over seeds)",
        "",
    ]
    lines += common.markdown_table(["target", "status", "measured"], [list(t) for t in check_targets(records)],
                                   align=["l", "l", "l"]).splitlines()
    lines += ["", "Why a target falls short is measured in `em_analysis.md` (`benchmarks/em_analysis.py`: pixel",
              "errors on the test slices, accuracy of the EMA pseudo-labels against the full labels)."]
    lines += [f"Profile `{name}` ({PROFILE_NOTES[name]}) reports its Scribble2Label beside these records in "
              f"`{results_path(name).with_suffix('.md').name}`." for name, base in BASELINE_PROFILES.items()
              if base == profile and not baseline]
    lines += [""]
    return "\n".join(lines)


def write_report(results: Path, header: dict[str, Any]) -> Path:
    """Regenerate ``em.md`` next to ``results``."""
    md = results.with_suffix(".md")
    records = common.load_records(results)
    profile = _profiles(records, header)[0]
    baseline: list[dict[str, Any]] = []
    if profile in BASELINE_PROFILES:  # the other methods' records of the base profile, next to this result file
        base = results.parent / results_path(BASELINE_PROFILES[profile]).name
        baseline = [r for r in common.load_records(base) if r.get("method") != "s2l"]
    common.write_text_atomic(md, render_report(records, {"results_name": results.name, **header}, baseline))
    return md


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; exit 0 when every attempted run succeeded, 1 otherwise, 2 on bad input."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"ISBI 2012 folder (default {DEFAULT_DATA})")
    p.add_argument("--work", type=Path, default=Path("/tmp/s2l_em"))
    p.add_argument("--only", nargs="+", default=None, metavar="METHOD:SEED")
    p.add_argument("--max-runs", type=int, default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS),
                   help=f"training seeds (default {' '.join(map(str, SEEDS))}); more seeds add runs to the plan")
    p.add_argument("--list", action="store_true")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--profile", choices=sorted(PROFILES), default="cpu",
                   help="cpu: 2 CPU cores, <= 10 minutes per run (default); gpu-short: a lent GPU machine")
    p.add_argument("--results", type=Path, default=None,
                   help="result JSON (default benchmarks/results/em.json, em_<profile>.json for other profiles)")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    results = args.results or results_path(args.profile)
    if args.smoke and args.results is None:
        results = args.work / "results_smoke" / results.name
    given = sys.argv[1:] if argv is None else argv
    harness_cmd = "python benchmarks/em.py " + " ".join(shlex.quote(a) for a in given)
    try:
        plan = select_plan(build_plan(args.profile, args.seeds), args.only)
        records = common.load_records(results)
    except ValueError as exc:
        print(f"em.py: error: {exc}", file=sys.stderr)
        return 2
    if args.list:
        done = {dsb.record_key(r) for r in records}
        for run in plan:
            print(f"{'done   ' if run.key in done else 'pending'}  {run.run_id}")
        return 0
    header = {"command": harness_cmd, "machine": common.machine_info(), "profile": args.profile}
    if args.report_only:
        print(f"[em] wrote {write_report(results, header)}")
        return 0
    data_dir = args.work / ("data_smoke" if args.smoke else "data")
    try:
        prepare_data(args.data, data_dir, SMOKE_SPLIT if args.smoke else SPLIT)
    except FileNotFoundError as exc:
        print(f"em.py: error: {exc}", file=sys.stderr)
        return 2
    done = {dsb.record_key(r) for r in records}
    todo = [r for r in plan if r.key not in done]
    if args.max_runs is not None:
        todo = todo[: max(0, args.max_runs)]
    context = {"profile": args.profile + ("+smoke" if args.smoke else ""), "machine": header["machine"],
               "git_commit": common.git_commit(REPO_ROOT), "harness_command": harness_cmd,
               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", common.CHILD_ENV["OMP_WAIT_POLICY"])}
    failed = []
    for i, run in enumerate(todo, 1):
        print(f"[em] ({i}/{len(todo)}) {run.run_id}", flush=True)
        try:
            record = execute_run(run, data_dir, args.work, {**context, "date": common.now_iso()}, smoke=args.smoke,
                                 profile=args.profile)
        except (RuntimeError, OSError, ValueError, KeyError) as exc:
            print(f"[em] FAILED {run.run_id}: {exc}", file=sys.stderr, flush=True)
            failed.append(run.run_id)
            continue
        common.append_record(results, record, KEY_FIELDS)
        print(f"[em] {run.run_id}: IoU {common.fmt(record['iou'])} mDice {common.fmt(record['mdice'])} "
              f"train {record['train_seconds']} s, peak RSS {record['peak_rss_mb']} MB", flush=True)
        write_report(results, header)
    md = write_report(results, header)
    print(f"[em] results: {results}, report: {md}", flush=True)
    if failed:
        print(f"[em] {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
