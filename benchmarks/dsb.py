"""DSB2018 (BBBC038) reproduction benchmark of Scribble2Label: the paper's Table 1 DSB columns and Table 2.

Resumable: every finished run appends one record to ``benchmarks/results/dsb.json`` (written atomically) and a
rerun skips the (dataset, ratio, method, seed) records already there; ``benchmarks/results/dsb.md`` is regenerated
after every run. See ``benchmarks/README.md``.

Examples::

    .venv/bin/python benchmarks/dsb.py --zip ../shared/data/bbbc038/stage1_train.zip --work /tmp/s2l_dsb
    .venv/bin/python benchmarks/dsb.py --zip ... --work /tmp/s2l_dsb --list
    .venv/bin/python benchmarks/dsb.py --zip ... --work /tmp/s2l_dsb --only fluorescence:30:s2l:0 --max-runs 1
    .venv/bin/python benchmarks/dsb.py --report-only

Every method is an override of the SAME ``configs/train.json`` (see :data:`METHOD_OVERRIDES`), and every model
is evaluated on the test split by ``configs/evaluate.json`` twice: connected components (the paper's
post-processing, the primary numbers) and distance-transform watershed.
"""

from __future__ import annotations

import argparse
import json
import math
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
    from benchmarks import common
except ImportError:  # run as a script: python benchmarks/dsb.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import common

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
DEFAULT_ZIP = REPO_ROOT.parent / "shared" / "data" / "bbbc038" / "stage1_train.zip"
DOWNLOAD_URL = "https://bbbc.broadinstitute.org/BBBC038"

# --------------------------------------------------------------------------------------------------------------
# Profiles. ``cpu``: each training run must take at most 10 minutes on 2 CPU cores.
# The values below are measured on this machine (comments say how); change them here and only here.
# --------------------------------------------------------------------------------------------------------------
CPU_PROFILE: dict[str, Any] = {
    # DSB-Fluo: 328 training images (209 of 256x256, 52 of 520x696, 48 of 360x360, ...). Measured on 2 cores:
    # ~30 training patches/s (128x128) and ~30 s per ensemble over all 328 images, so 9 epochs of 1312 patches
    # plus 4 ensembles stay under 10 minutes.
    "max_epochs": 9,
    "warmup_epochs": 4,
    "ema_every": 2,
    "roi_size": [128, 128],
    "num_samples": 4,
    "batch_size": 16,
    "learning_rate": 3e-3,
    "num_workers": 1,
    # the records of this profile were measured with sliding-window ensembles (the bundle's default before
    # whole-image ensembles, see s2l_monai/inferers.py); pinned so that a rerun reproduces them
    "ensemble_whole_image": False,
}
#: Per-modality changes on top of a profile, keeping each run under 10 minutes with a comparable number of steps:
#: bright-field has 10 training images of 1024x1024 (many patches per image), histopathology 65 of 256x320.
CPU_MODALITY_OVERRIDES: dict[str, dict[str, Any]] = {
    "brightfield": {"num_samples": 64, "max_epochs": 18, "warmup_epochs": 8},
    "histopathology": {"num_samples": 8, "max_epochs": 24, "warmup_epochs": 10},
}
#: ``cpu-balanced``: the ``cpu`` profile plus a class prior correction of the scribble loss (not in the paper).
#: The automatic scribbles put 36% of their pixels on nuclei that cover 14% of a DSB-Fluo image (2.5x; see
#: ``dsb_analysis.md``, "class balance"), and every scribble-trained model over-segments. ``class_weights``
#: counts background scribble pixels 3x in L_sp (about the odds ratio 3.5 of that imbalance), chosen on the
#: VALIDATION split of DSB-Fluo 30% (benchmarks/README.md, "Class prior"); ``pseudo_class_weights`` does the
#: same in L_up, where self-training on the pseudo-labels otherwise regrows the over-segmentation, and L_up starts
#: after 6 of the 9 epochs instead of 4 (also chosen on validation). Full masks are an unbiased sample of the
#: pixels, so the Full baseline stays unweighted.
CPU_BALANCED_PROFILE: dict[str, Any] = {
    **CPU_PROFILE, "warmup_epochs": 6, "class_weights": [3.0, 1.0], "pseudo_class_weights": [3.0, 1.0],
}
#: ``cpu-balanced-e12``: ``cpu-balanced`` on 12 epochs (8 of warm-up, 6 ensembles) instead of 9, which fit the same
#: 10-minute budget once the ensemble runs on whole images (``ensemble_whole_image``, the bundle's default:
#: 15-17 s per ensemble over the 328 DSB-Fluo training images instead of 26-33 s with sliding windows). Chosen on
#: the validation split of DSB-Fluo 30%, seed 0 (benchmarks/README.md, "Class prior"): S2L 0.745 -> 0.800,
#: pCE 0.768 -> 0.797. ``max_train_seconds`` keeps a slow host inside the budget.
CPU_BALANCED_E12_PROFILE: dict[str, Any] = {
    **CPU_BALANCED_PROFILE, "max_epochs": 12, "warmup_epochs": 8, "ensemble_whole_image": True,
    "max_train_seconds": 570,
}
#: ``cpu-balanced-e12-a05``: ``cpu-balanced-e12`` with the EMA weight ``ema_alpha`` 0.5 instead of the paper's 0.2,
#: which changes Scribble2Label only (Pseudo-label sets alpha 1; pCE and Full run no ensembles). Why: the paper's
#: EMA forgets with a time constant of ema_every / alpha = 25 epochs in a 300-epoch run; here it would be 10 epochs in
#: a 12-epoch run, so while L_up is on (epochs 9-12) 41-51% of the average is still the epoch-2 prediction
#: (y_0 = p_2, weight 0.8^3 / 0.8^4). With alpha 0.5 that weight is 6-13%. Chosen on the validation split of DSB-Fluo
#: 30%, seed 0 (benchmarks/README.md, "Class prior"): S2L IoU 0.7997 -> 0.8054.
CPU_BALANCED_E12_A05_PROFILE: dict[str, Any] = {**CPU_BALANCED_E12_PROFILE, "ema_alpha": 0.5}
#: ``paper``: the authors' recipe from ``configs/paper.json`` (for a GPU), no further overrides.
PAPER_PROFILE: dict[str, Any] = {}
#: ``paper-short``: the authors' recipe (``configs/paper.json``: ResNet-50 U-Net, 256x256 crops, batch 30, lr 3e-4,
#: cosine warm restarts every 50 epochs, tau 0.8, alpha 0.2, an ensemble every 5 epochs) on a third of its schedule,
#: 100 epochs with 30 of warm-up (the paper: 300 and 100), to fit a 15-minute GPU lease with four runs sharing one
#: GPU and 16 CPU cores (3 loader workers each). Measured here: loading and augmenting one 256x256 training sample
#: takes 15-23 ms of one CPU core, so the loaders, not the GPU, set the pace. ``max_train_seconds`` stops a run at
#: the last epoch that fits (the record holds the epochs trained).
PAPER_SHORT_PROFILE: dict[str, Any] = {
    "max_epochs": 100, "warmup_epochs": 30, "max_train_seconds": 350, "num_workers": 3,
    "ensemble_whole_image": False,  # as measured (sliding-window ensembles)
}
#: ``default``: the bundle's own defaults in ``configs/train.json`` (60 epochs, 20 of warm-up, an ensemble every
#: 5 epochs), unchanged: what a user gets from ``monai.bundle run training`` (minutes on a GPU).
DEFAULT_PROFILE: dict[str, Any] = {}
PROFILES: dict[str, dict[str, Any]] = {
    "cpu": CPU_PROFILE, "cpu-balanced": CPU_BALANCED_PROFILE, "cpu-balanced-e12": CPU_BALANCED_E12_PROFILE,
    "cpu-balanced-e12-a05": CPU_BALANCED_E12_A05_PROFILE,
    "default": DEFAULT_PROFILE, "paper": PAPER_PROFILE,
    "paper-short": PAPER_SHORT_PROFILE,
    "paper-short-balanced": {**PAPER_SHORT_PROFILE, "class_weights": [3.0, 1.0], "pseudo_class_weights": [3.0, 1.0],
                             "max_train_seconds": 190, "num_workers": 6},
}
#: One line per profile for the report header.
PROFILE_NOTES: dict[str, str] = {
    "cpu": "the paper's loss (unweighted) on the 2-core budget (`CPU_PROFILE` in dsb.py)",
    "cpu-balanced": "the `cpu` recipe plus `class_weights [3, 1]`, `pseudo_class_weights [3, 1]`, `warmup_epochs 6` for"
                    " the scribble methods, chosen on the validation split (benchmarks/README.md, \"Class prior\");"
                    " Full unweighted",
    "cpu-balanced-e12": "`cpu-balanced` on 12 epochs (8 of warm-up) with whole-image ensembles, the same 10-minute"
                        " budget (`CPU_BALANCED_E12_PROFILE` in dsb.py)",
    "cpu-balanced-e12-a05": "`cpu-balanced-e12` with `ema_alpha 0.5` (Scribble2Label's EMA remembers ~4 epochs"
                            " instead of ~10 in a 12-epoch run; `CPU_BALANCED_E12_A05_PROFILE` in dsb.py). pCE,"
                            " Pseudo-label and Full are configured exactly as in `cpu-balanced-e12`: compare with"
                            " their records in `dsb_cpu-balanced-e12.md`",
    "default": "the bundle's defaults of configs/train.json",
    "paper": "configs/train.json + configs/paper.json, the authors' recipe",
    "paper-short": "configs/paper.json (the authors' network, crops, batch, optimiser and tau/alpha/gamma) on 100"
                   " epochs with 30 of warm-up instead of 300/100 (`PAPER_SHORT_PROFILE` in dsb.py), for a GPU",
    "paper-short-balanced": "`paper-short` plus the class weights of `cpu-balanced`, 190 s of training (a second,"
                            " shorter call of one GPU lease)",
}
#: Profiles on the 2-core CPU budget (modality overrides apply, each training <= 10 minutes).
CPU_PROFILES: tuple[str, ...] = ("cpu", "cpu-balanced", "cpu-balanced-e12", "cpu-balanced-e12-a05")
PROFILE_CONFIGS: dict[str, list[str]] = {
    "cpu": ["configs/train.json"],
    "cpu-balanced": ["configs/train.json"],
    "cpu-balanced-e12": ["configs/train.json"],
    "cpu-balanced-e12-a05": ["configs/train.json"],
    "default": ["configs/train.json"],
    "paper": ["configs/train.json", "configs/paper.json"],
    "paper-short": ["configs/train.json", "configs/paper.json"],
    "paper-short-balanced": ["configs/train.json", "configs/paper.json"],
}
#: ``--smoke`` (hidden): a 1-epoch run on a few images, to check the harness end to end in ~1-2 minutes.
SMOKE_OVERRIDES: dict[str, Any] = {"max_epochs": 1, "warmup_epochs": 0, "ema_every": 1, "num_workers": 0}
SMOKE_LIMIT = 15  # images per modality given to prepare_dsb2018(limit=...)

# --------------------------------------------------------------------------------------------------------------
# Methods, datasets, plan
# --------------------------------------------------------------------------------------------------------------
#: Each baseline is an override of the same configs/train.json.
METHOD_OVERRIDES: dict[str, dict[str, Any]] = {
    "s2l": {},  # Scribble2Label: the defaults
    # partial cross-entropy on the scribbles only; no pseudo-labels, so no ensembles are run (interval > epochs)
    "pce": {"lambda_up": 0, "ema_every": 100000},
    "pseudo": {"ema_alpha": 1.0},  # threshold the latest prediction at tau, no averaging over time
    # full masks as scribbles everywhere (datalist_full.json); no ensembles either
    "full": {"lambda_up": 0, "ema_every": 100000, "class_weights": None, "pseudo_class_weights": None},
}
METHOD_LABELS: dict[str, str] = {
    "pce": "pCE only",
    "pseudo": "Pseudo-label",
    "s2l": "Scribble2Label",
    "full": "Full",
    "otsu": "Otsu (no learning)",
}
DATASETS: dict[str, str] = {"fluorescence": "dsb_fluo", "brightfield": "dsb_bf", "histopathology": "dsb_histo"}
MODALITY_OF: dict[str, str] = {v: k for k, v in DATASETS.items()}
DATASET_LABELS: dict[str, str] = {"dsb_bf": "DSB-BF", "dsb_fluo": "DSB-Fluo", "dsb_histo": "DSB-Histo"}
IN_CHANNELS: dict[str, int] = {"fluorescence": 1, "brightfield": 1, "histopathology": 3}
KEY_FIELDS: tuple[str, ...] = ("dataset", "ratio", "method", "seed")
REQUIRED_KEYS: tuple[str, ...] = (
    "dataset", "ratio", "method", "seed", "iou", "mdice", "dsb_score", "pq", "train_seconds", "peak_rss_mb",
)

# Paper numbers, IoU [mDice], Lee & Jeong, MICCAI 2020 (arXiv 2006.12890), as restated in
# /work/shared/docs/method.md. The paper's mDice is its own (per-image, defective) variant: compare it with our
# ``mdice_paper``; our table cells show the correct pooled mDice.
# Table 1 (DSB columns; 30% scribbles for the scribble methods):
PAPER_TABLE1: dict[str, dict[str, tuple[float, float]]] = {
    "pce": {"dsb_bf": (0.7954, 0.7351), "dsb_fluo": (0.8293, 0.8375), "dsb_histo": (0.7804, 0.7173)},
    "pseudo": {"dsb_bf": (0.6177, 0.6826), "dsb_fluo": (0.8109, 0.8136), "dsb_histo": (0.7888, 0.7096)},
    "s2l": {"dsb_bf": (0.8236, 0.7663), "dsb_fluo": (0.8426, 0.8443), "dsb_histo": (0.7970, 0.7246)},
    "full": {"dsb_bf": (0.8774, 0.7879), "dsb_fluo": (0.8688, 0.8390), "dsb_histo": (0.8134, 0.7014)},
}
# Table 2 (DSB-Fluo, automatic scribbles at 10/30/50/100%):
PAPER_TABLE2: dict[str, dict[float, tuple[float, float]]] = {
    "pce": {0.1: (0.7996, 0.8136), 0.3: (0.8180, 0.8251), 0.5: (0.8189, 0.8204), 1.0: (0.8098, 0.8263)},
    "pseudo": {0.1: (0.7920, 0.8086), 0.3: (0.7984, 0.8236), 0.5: (0.8316, 0.8392), 1.0: (0.8283, 0.8251)},
    "s2l": {0.1: (0.8274, 0.8188), 0.3: (0.8539, 0.8407), 0.5: (0.8497, 0.8406), 1.0: (0.8588, 0.8443)},
}
RATIOS: tuple[float, ...] = (0.1, 0.3, 0.5, 1.0)
TARGET_S2L_IOU_30 = 0.854  # issue 3: S2L at 30% scribbles on DSB-Fluo, IoU >= 0.854 (paper 0.8539)


@dataclass(frozen=True)
class RunSpec:
    """One benchmark run: a dataset (modality), scribble ratio (``None``: full masks / no training), method, seed."""

    modality: str
    ratio: float | None
    method: str
    seed: int | None

    @property
    def dataset(self) -> str:
        return DATASETS[self.modality]

    @property
    def key(self) -> tuple[Any, ...]:
        return record_key({"dataset": self.dataset, "ratio": self.ratio, "method": self.method, "seed": self.seed})

    @property
    def ratio_tag(self) -> str:
        return "full" if self.ratio is None else str(round(self.ratio * 100))

    @property
    def datalist_name(self) -> str:
        """Training datalist; Otsu is evaluated on the test split of the 30% one (same split everywhere)."""
        if self.method == "full":
            return "datalist_full.json"
        return f"datalist_{'30' if self.ratio is None else self.ratio_tag}.json"

    @property
    def run_id(self) -> str:
        seed = "-" if self.seed is None else self.seed
        return f"{self.modality}:{self.ratio_tag}:{self.method}:{seed}"

    @property
    def dir_name(self) -> str:
        seed = "na" if self.seed is None else f"s{self.seed}"
        return f"{self.dataset}_{self.ratio_tag}_{self.method}_{seed}"


def record_key(record: dict[str, Any]) -> tuple[Any, ...]:
    """The resume key of a record: (dataset, ratio rounded, method, seed)."""
    ratio = record.get("ratio")
    return (
        record.get("dataset"),
        None if ratio is None else round(float(ratio), 6),
        record.get("method"),
        record.get("seed"),
    )


def build_plan() -> list[RunSpec]:
    """All runs, most important first (about 25 trainings plus 3 Otsu evaluations).

    Order: DSB-Fluo 30% S2L / pCE / Pseudo / Full seed 0, the Otsu line of DSB-Fluo, the same four with seed 1,
    DSB-Fluo 10/50/100% (seed 0), then bright-field and histopathology at 30% with their Full and Otsu lines.
    """
    fl, bf, hi = "fluorescence", "brightfield", "histopathology"
    plan: list[RunSpec] = []
    for seed in (0, 1):
        plan += [RunSpec(fl, 0.3, m, seed) for m in ("s2l", "pce", "pseudo")]
        plan.append(RunSpec(fl, None, "full", seed))
        if seed == 0:
            plan.append(RunSpec(fl, None, "otsu", None))
    for ratio in (0.1, 0.5, 1.0):
        plan += [RunSpec(fl, ratio, m, 0) for m in ("s2l", "pce", "pseudo")]
    for modality in (bf, hi):
        plan += [RunSpec(modality, 0.3, m, 0) for m in ("s2l", "pce", "pseudo")]
        plan.append(RunSpec(modality, None, "full", 0))
        plan.append(RunSpec(modality, None, "otsu", None))
    return plan


def _parse_only(spec: str) -> tuple[str, str, str, str]:
    parts = spec.split(":")
    if len(parts) != 4:
        raise ValueError(f"--only {spec!r}: expected MODALITY:RATIO:METHOD:SEED, e.g. fluorescence:30:s2l:0 "
                         "(RATIO 10/30/50/100 or full; SEED '-' for otsu; '*' matches anything)")
    modality = MODALITY_OF.get(parts[0], parts[0])
    if modality != "*" and modality not in DATASETS:
        raise ValueError(f"--only {spec!r}: unknown modality {parts[0]!r}; choose from {list(DATASETS)}")
    return modality, parts[1], parts[2], parts[3]


def select_plan(plan: Sequence[RunSpec], only: Sequence[str] | None) -> list[RunSpec]:
    """The runs of ``plan`` matching any ``--only`` pattern (all of them without patterns), in plan order."""
    if not only:
        return list(plan)
    patterns = [_parse_only(s) for s in only]

    def match(run: RunSpec, pat: tuple[str, str, str, str]) -> bool:
        seed = "-" if run.seed is None else str(run.seed)
        return all(p == "*" or p == v for p, v in zip(pat, (run.modality, run.ratio_tag, run.method, seed)))

    selected = [r for r in plan if any(match(r, p) for p in patterns)]
    if not selected:
        raise ValueError(f"--only {list(only)} matches no run of the plan; see --list")
    return selected


def pending_runs(plan: Sequence[RunSpec], records: Sequence[dict[str, Any]]) -> list[RunSpec]:
    """The runs of ``plan`` without a record yet."""
    done = {record_key(r) for r in records}
    return [r for r in plan if r.key not in done]


# --------------------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------------------


def _cli_value(value: Any) -> str:
    """An override value as the MONAI bundle CLI (python-fire) parses it back."""
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _config_arg(files: Sequence[str]) -> str:
    return files[0] if len(files) == 1 else "[" + ",".join(f"'{f}'" for f in files) + "]"


def train_overrides(run: RunSpec, profile: str, smoke: bool = False) -> dict[str, Any]:
    """Bundle overrides of one training run: profile, modality tweaks, method, smoke (later ones win)."""
    over: dict[str, Any] = dict(PROFILES[profile])
    if profile in CPU_PROFILES:
        over.update(CPU_MODALITY_OVERRIDES.get(run.modality, {}))
    over.update(METHOD_OVERRIDES[run.method])
    if smoke:
        over.update(SMOKE_OVERRIDES)
    return over


def train_command(run: RunSpec, profile: str, dataset_dir: Path, run_dir: Path, smoke: bool = False) -> list[str]:
    """``python -m monai.bundle run training ...`` for one run (cwd = repository root)."""
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "training",
        "--config_file", _config_arg(PROFILE_CONFIGS[profile]),
        "--dataset_dir", str(dataset_dir),
        "--datalist_name", run.datalist_name,
        "--output_dir", str(run_dir / "train"),
        "--ckpt_dir", str(run_dir / "ckpt"),
        "--seed", str(run.seed),
        "--in_channels", str(IN_CHANNELS[run.modality]),
    ]
    for key, value in train_overrides(run, profile, smoke).items():
        cmd += [f"--{key}", _cli_value(value)]
    return cmd


def eval_command(
    run: RunSpec, profile: str, dataset_dir: Path, ckpt: Path, out_dir: Path, instance_method: str
) -> list[str]:
    """``python -m monai.bundle run evaluate ...`` on the test split (a profile's extra configs add its network)."""
    files = ["configs/inference.json", "configs/evaluate.json"]
    files += PROFILE_CONFIGS[profile][1:]  # e.g. configs/paper.json: the same network_def as in training
    return [
        sys.executable, "-m", "monai.bundle", "run", eval_run_id(),
        "--config_file", _config_arg(files),
        "--dataset_dir", str(dataset_dir),
        "--datalist_name", run.datalist_name,
        "--ckpt_path", str(ckpt),
        "--output_dir", str(out_dir),
        "--instance_method", instance_method,
        "--in_channels", str(IN_CHANNELS[run.modality]),
    ]


def eval_run_id(config: Path | None = None) -> str:
    """The run id of ``configs/evaluate.json``: ``evaluate`` if it defines one, else ``evaluating``, else ``run``."""
    keys = json.loads((config or REPO_ROOT / "configs" / "evaluate.json").read_text())
    return next((k for k in ("evaluate", "evaluating") if k in keys), "run")


def otsu_command(dataset_dir: Path, datalist_name: str, out_dir: Path, instance_method: str) -> list[str]:
    """``s2l otsu`` on the test split."""
    return [
        sys.executable, "-m", "s2l_monai", "otsu",
        "--datalist", str(dataset_dir / datalist_name),
        "--split", "test",
        "--out", str(out_dir),
        "--instance-method", instance_method,
    ]


def _quote(cmd: Sequence[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


# --------------------------------------------------------------------------------------------------------------
# Running one benchmark item
# --------------------------------------------------------------------------------------------------------------


def _effective_config(profile: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Top-level keys of the profile's config files with ``overrides`` applied (plain values only)."""
    cfg: dict[str, Any] = {}
    for name in PROFILE_CONFIGS[profile]:
        cfg.update(json.loads((REPO_ROOT / name).read_text()))
    cfg.update(overrides)
    return cfg


def _trained_epochs(ckpt_dir: Path) -> tuple[int | None, int | None]:
    """(epochs, iterations) from the trainer state in ``checkpoint_final.pt``, or ``(None, None)``."""
    path = ckpt_dir / "checkpoint_final.pt"
    if not path.is_file():
        return None, None
    try:
        import torch

        state = torch.load(path, map_location="cpu", weights_only=False).get("trainer", {})
        iteration, epoch_length = int(state["iteration"]), int(state["epoch_length"])
        # ignite's state_dict holds iteration and epoch_length (and sometimes epoch)
        epoch = int(state["epoch"]) if state.get("epoch") is not None else iteration // max(1, epoch_length)
        return epoch, iteration
    except Exception:  # noqa: BLE001 - fall back to the configured epochs
        return None, None


def _read_summary(out_dir: Path) -> dict[str, Any]:
    path = out_dir / "summary.json"
    if not path.is_file():
        raise RuntimeError(f"{path} was not written; see the log in {out_dir.parent}")
    return json.loads(path.read_text())


def _num(summary: dict[str, Any], key: str) -> float | None:
    value = summary.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def make_record(
    run: RunSpec,
    connected: dict[str, Any],
    watershed: dict[str, Any],
    train: dict[str, Any],
    context: dict[str, Any],
) -> dict[str, Any]:
    """The result record of one run from its two evaluation summaries and its training measurements.

    The connected-component summary gives the primary numbers (the paper's post-processing); the watershed one
    gives the ``*_watershed`` extras.
    """
    rec: dict[str, Any] = {
        "dataset": run.dataset,
        "ratio": run.ratio,
        "method": run.method,
        "seed": run.seed,
        "iou": _num(connected, "iou"),
        "mdice": _num(connected, "mdice"),
        "dsb_score": _num(connected, "dsb"),
        "pq": _num(connected, "pq"),
        "train_seconds": train.get("train_seconds", 0.0),
        "peak_rss_mb": train.get("peak_rss_mb"),
        "images_per_second": train.get("images_per_second"),
        "mdice_paper": _num(connected, "mdice_paper"),
        "aji": _num(connected, "aji"),
        "f1_50": _num(connected, "f1_50"),
        "sq": _num(connected, "sq"),
        "rq": _num(connected, "rq"),
        "dsb_score_watershed": _num(watershed, "dsb"),
        "pq_watershed": _num(watershed, "pq"),
        "aji_watershed": _num(watershed, "aji"),
        "f1_50_watershed": _num(watershed, "f1_50"),
        "mdice_watershed": _num(watershed, "mdice"),
        "n_test_images": connected.get("n_images"),
        "n_test_nuclei": connected.get("n_nuclei"),
    }
    for key in ("n_train_images", "epochs", "iterations", "patches", "overrides", "eval_seconds", "wall_seconds"):
        if key in train:
            rec[key] = train[key]
    rec.update(context)
    rec["command"] = train.get("command")
    return rec


def runs_dir(work: Path, profile: str) -> Path:
    """Run folders of a profile under ``work`` (``runs`` for ``cpu``), so no profile reuses another's training."""
    return work / ("runs" if profile == "cpu" else f"runs_{profile}")


def execute_run(
    run: RunSpec, profile: str, data_dir: Path, work: Path, context: dict[str, Any], smoke: bool = False
) -> dict[str, Any]:
    """Train (unless ``otsu``) and evaluate one run; return its record. Raises ``RuntimeError`` on failure.

    A training that finished earlier (``train_meta.json`` next to ``ckpt/model.pt``) is reused, so a run whose
    evaluation failed does not train again.
    """
    dataset_dir = data_dir / run.modality
    run_dir = runs_dir(work, profile) / run.dir_name
    log = run_dir / "log.txt"
    start = time.perf_counter()
    train: dict[str, Any]
    reused, train_reused_seconds = False, 0.0
    if run.method == "otsu":
        summaries, eval_rss, eval_seconds = {}, 0.0, 0.0
        for method in ("connected", "watershed"):
            out = run_dir / f"eval_{method}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = otsu_command(dataset_dir, run.datalist_name, out, method)
            res = common.run_measured(cmd, REPO_ROOT, log)
            if res.returncode != 0:
                raise RuntimeError(f"{run.run_id}: otsu ({method}) exited {res.returncode}; see {log}")
            summaries[method] = _read_summary(out)
            eval_rss, eval_seconds = max(eval_rss, res.peak_rss_mb), eval_seconds + res.seconds
        train = {"train_seconds": 0.0, "peak_rss_mb": eval_rss, "images_per_second": None, "command": _quote(cmd),
                 "eval_seconds": round(eval_seconds, 1)}
    else:
        meta_path = run_dir / "train_meta.json"
        ckpt = run_dir / "ckpt" / "model.pt"
        if meta_path.is_file() and ckpt.is_file():
            train = json.loads(meta_path.read_text())
            reused, train_reused_seconds = True, float(train.get("train_seconds") or 0.0)
            print(f"[dsb] {run.run_id}: reusing the finished training in {run_dir}", flush=True)
        else:
            for sub in ("train", "ckpt"):
                shutil.rmtree(run_dir / sub, ignore_errors=True)
            cmd = train_command(run, profile, dataset_dir, run_dir, smoke)
            print(f"[dsb] {run.run_id}: training ({_quote(cmd)})", flush=True)
            res = common.run_measured(cmd, REPO_ROOT, log)
            if res.returncode != 0 or not ckpt.is_file():
                raise RuntimeError(f"{run.run_id}: training exited {res.returncode}; see {log}")
            overrides = train_overrides(run, profile, smoke)
            cfg = _effective_config(profile, overrides)
            datalist = json.loads((dataset_dir / run.datalist_name).read_text())
            n_train = len(datalist.get("training", []))
            epochs, iterations = _trained_epochs(run_dir / "ckpt")
            epochs = epochs if epochs is not None else int(cfg["max_epochs"])
            patches = n_train * int(cfg["num_samples"]) * epochs
            train = {
                "train_seconds": round(res.seconds, 1),
                "peak_rss_mb": res.peak_rss_mb,
                "images_per_second": round(patches / res.seconds, 2) if res.seconds > 0 else None,
                "n_train_images": n_train,
                "epochs": epochs,
                "iterations": iterations,
                "patches": patches,
                "overrides": overrides,
                "command": _quote(cmd),
            }
            common.write_json_atomic(meta_path, train)
        summaries, eval_seconds = {}, 0.0
        for method in ("connected", "watershed"):
            out = run_dir / f"eval_{method}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = eval_command(run, profile, dataset_dir, ckpt, out, method)
            print(f"[dsb] {run.run_id}: evaluating ({method})", flush=True)
            res = common.run_measured(cmd, REPO_ROOT, log)
            if res.returncode != 0:
                raise RuntimeError(f"{run.run_id}: evaluation ({method}) exited {res.returncode}; see {log}")
            summaries[method] = _read_summary(out)
            eval_seconds += res.seconds
        train = {**train, "eval_seconds": round(eval_seconds, 1)}
    # the whole run as it happened now (an earlier, reused training counts with its own seconds)
    train["wall_seconds"] = round(time.perf_counter() - start, 1) + (train_reused_seconds if reused else 0.0)
    return make_record(run, summaries["connected"], summaries["watershed"], train, context)


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------


def _select(records: Sequence[dict[str, Any]], dataset: str, method: str, ratio: float | None) -> list[dict]:
    r_key = None if ratio is None else round(ratio, 6)
    return [
        r for r in records
        if r.get("dataset") == dataset and r.get("method") == method
        and (None if r.get("ratio") is None else round(float(r["ratio"]), 6)) == r_key
    ]


def _stat(records: Sequence[dict[str, Any]], key: str) -> tuple[float | None, float | None, int]:
    return common.mean_std(r.get(key) for r in records)


def ours_cell(records: Sequence[dict[str, Any]]) -> str:
    """``IoU [mDice]`` as mean over seeds, ``±std`` with 2 or more seeds, ``(n=k)``; ``–`` without records."""
    if not records:
        return common.DASH
    iou, iou_sd, n = _stat(records, "iou")
    md, md_sd, _ = _stat(records, "mdice")
    cell = f"{common.fmt(iou, 4, iou_sd)} [{common.fmt(md, 4, md_sd)}]"
    return cell + (f" (n={n})" if n >= 2 else "")


def paper_cell(value: tuple[float, float] | None) -> str:
    """The paper's ``IoU [mDice]``, or ``–``."""
    return common.DASH if value is None else f"{value[0]:.4f} [{value[1]:.4f}]"


def _table1_ratio(method: str) -> float | None:
    return None if method in ("full", "otsu") else 0.3


def table1(records: Sequence[dict[str, Any]]) -> str:
    """Table 1 style: methods × (DSB-BF, DSB-Fluo, DSB-Histo) at 30%, ours beside the paper's."""
    datasets = ["dsb_bf", "dsb_fluo", "dsb_histo"]
    headers = ["method"]
    for d in datasets:
        headers += [f"{DATASET_LABELS[d]} ours", f"{DATASET_LABELS[d]} paper"]
    rows = []
    for method in ("pce", "pseudo", "s2l", "full", "otsu"):
        row = [METHOD_LABELS[method]]
        for d in datasets:
            row.append(ours_cell(_select(records, d, method, _table1_ratio(method))))
            row.append(paper_cell(PAPER_TABLE1.get(method, {}).get(d)))
        rows.append(row)
    return common.markdown_table(headers, rows)


def table2(records: Sequence[dict[str, Any]]) -> str:
    """Table 2 style: DSB-Fluo at 10/30/50/100% scribbles, ours beside the paper's."""
    headers = ["method"]
    for ratio in RATIOS:
        headers += [f"{ratio:.0%} ours", f"{ratio:.0%} paper"]
    rows = []
    for method in ("pce", "pseudo", "s2l"):
        row = [METHOD_LABELS[method]]
        for ratio in RATIOS:
            row.append(ours_cell(_select(records, "dsb_fluo", method, ratio)))
            row.append(paper_cell(PAPER_TABLE2[method].get(ratio)))
        rows.append(row)
    return common.markdown_table(headers, rows)


def _order_index(record: dict[str, Any], plan_keys: dict[tuple, int]) -> tuple[int, str]:
    return plan_keys.get(record_key(record), len(plan_keys)), json.dumps(record_key(record), default=str)


def records_table(records: Sequence[dict[str, Any]]) -> str:
    """Every record, in plan order, with the instance metrics and the costs."""
    plan_keys = {r.key: i for i, r in enumerate(build_plan())}
    headers = ["dataset", "ratio", "method", "seed", "IoU", "mDice", "mDice (paper var.)", "DSB cc", "DSB ws",
               "PQ cc", "PQ ws", "AJI", "F1@0.5", "train s", "peak RSS MB", "img/s", "profile", "ran on"]
    rows = []
    for r in sorted(records, key=lambda r: _order_index(r, plan_keys)):
        ratio = r.get("ratio")
        rows.append([
            DATASET_LABELS.get(r.get("dataset"), r.get("dataset")),
            (r.get("method") if r.get("method") == "full" else common.DASH) if ratio is None else f"{float(ratio):.0%}",
            r.get("method"),
            common.DASH if r.get("seed") is None else r.get("seed"),
            common.fmt(r.get("iou")),
            common.fmt(r.get("mdice")),
            common.fmt(r.get("mdice_paper")),
            common.fmt(r.get("dsb_score")),
            common.fmt(r.get("dsb_score_watershed")),
            common.fmt(r.get("pq")),
            common.fmt(r.get("pq_watershed")),
            common.fmt(r.get("aji")),
            common.fmt(r.get("f1_50")),
            common.fmt(r.get("train_seconds"), 0),
            common.fmt(r.get("peak_rss_mb"), 0),
            common.fmt(r.get("images_per_second"), 1),
            r.get("profile", common.DASH),
            ran_on(r.get("machine")),
        ])
    return common.markdown_table(headers, rows, align=["l", "r", "l", "r"] + ["r"] * (len(headers) - 4))


def record_notes(records: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown lines listing the ``note`` of every record that has one (empty when none has)."""
    notes = [f"- {DATASET_LABELS.get(r.get('dataset'), r.get('dataset'))} "
             f"{'full' if r.get('ratio') is None else format(float(r['ratio']), '.0%')} {r.get('method')} "
             f"seed {common.DASH if r.get('seed') is None else r.get('seed')}: {r['note']}"
             for r in records if r.get("note")]
    return ["Notes on individual records:", "", *notes, ""] if notes else []


def ran_on(machine: Any) -> str:
    """Short name of the machine a record was measured on: its GPU if it had one, else its core count."""
    if not isinstance(machine, dict):
        return common.DASH
    if machine.get("gpu"):
        return f"GPU ({str(machine['gpu']).replace('NVIDIA ', '')}, {machine.get('cores', '?')} cores)"
    return f"CPU, {machine.get('cores', '?')} cores"


def _gpu_note(records: Sequence[dict[str, Any]], profiles: Sequence[str]) -> list[str]:
    """Report lines on records measured on a GPU machine (none when every record ran on a CPU)."""
    if not any(isinstance(r.get("machine"), dict) and r["machine"].get("gpu") for r in records):
        return []
    if any(p in CPU_PROFILES for p in profiles):
        return ["Records that ran on the lent GPU machine use the same CPU profile (same epochs, patches and",
                "hyper-parameters), so their quality figures compare; their times and memory do not (several runs"
                " shared it)."]
    return ["Records that ran on a GPU machine shared it with the other runs of the same call (see the profile"
            " note), so their times and memory are not those of a run alone."]


def analysis_name(modality: str, profiles: Sequence[str], ratio: str = "30") -> str:
    """File name of the ``dsb_analysis.py`` report of a modality, scribble ratio tag and profile (the one naming
    rule: ``dsb_analysis.py`` writes to it, the reports point to it). Several profiles, or none: the ``cpu`` name."""
    suffix = f"_{profiles[0]}" if len(profiles) == 1 and profiles[0] != "cpu" else ""
    base = "dsb_analysis" if (modality, ratio) == ("fluorescence", "30") else f"dsb_analysis_{modality}_{ratio}"
    return base + suffix + ".md"


NOT_MEASURED = "not yet measured"


def check_targets(records: Sequence[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """The issue's targets on DSB-Fluo (means over seeds): ``(target, PASS|FAIL|not yet measured, detail)``."""
    out: list[tuple[str, str, str]] = []
    fluo = [r for r in records if r.get("dataset") == "dsb_fluo"]

    s2l30 = _select(fluo, "dsb_fluo", "s2l", 0.3)
    iou, _, n = _stat(s2l30, "iou")
    name = f"S2L IoU ≥ {TARGET_S2L_IOU_30} at 30% scribbles"
    if iou is None:
        out.append((name, NOT_MEASURED, "no S2L 30% record"))
    else:
        out.append((name, "PASS" if iou >= TARGET_S2L_IOU_30 else "FAIL", f"IoU {iou:.4f} (mean of {n} seed(s))"))

    full = _select(fluo, "dsb_fluo", "full", None)
    md_s, _, n_s = _stat(s2l30, "mdice")
    md_f, _, n_f = _stat(full, "mdice")
    name = "S2L 30% correct mDice ≥ Full (same budget)"
    if md_s is None or md_f is None:
        out.append((name, NOT_MEASURED, f"S2L records: {n_s}, Full records: {n_f}"))
    else:
        out.append((name, "PASS" if md_s >= md_f else "FAIL",
                    f"S2L {md_s:.4f} (n={n_s}) vs Full {md_f:.4f} (n={n_f})"))

    name = "S2L IoU above pCE and Pseudo-label at every ratio (10/30/50/100%)"
    details, fails, measured = [], 0, 0
    for ratio in RATIOS:
        s, _, _ = _stat(_select(fluo, "dsb_fluo", "s2l", ratio), "iou")
        p, _, _ = _stat(_select(fluo, "dsb_fluo", "pce", ratio), "iou")
        q, _, _ = _stat(_select(fluo, "dsb_fluo", "pseudo", ratio), "iou")
        if s is None or p is None or q is None:
            details.append(f"{ratio:.0%}: {NOT_MEASURED}")
            continue
        measured += 1
        ok = s > p and s > q
        fails += not ok
        details.append(f"{ratio:.0%}: S2L {s:.4f} vs pCE {p:.4f}, Pseudo {q:.4f} {'ok' if ok else 'SHORT'}")
    status = "FAIL" if fails else ("PASS" if measured == len(RATIOS) else NOT_MEASURED)
    if status == NOT_MEASURED and measured:
        status = f"{NOT_MEASURED} ({measured}/{len(RATIOS)} ratios, all ok so far)"
    out.append((name, status, "; ".join(details)))

    name = "Watershed DSB score > connected-component DSB score (S2L 30%)"
    cc, _, n_cc = _stat(s2l30, "dsb_score")
    ws, _, _ = _stat(s2l30, "dsb_score_watershed")
    learned = [r for r in fluo if r.get("method") != "otsu"
               and r.get("dsb_score") is not None and r.get("dsb_score_watershed") is not None]
    better = sum(r["dsb_score_watershed"] > r["dsb_score"] for r in learned)
    if cc is None or ws is None:
        out.append((name, NOT_MEASURED, f"all DSB-Fluo runs: watershed higher in {better}/{len(learned)}"))
    else:
        out.append((name, "PASS" if ws > cc else "FAIL",
                    f"{ws:.4f} vs {cc:.4f} (n={n_cc}); all DSB-Fluo runs: watershed higher in "
                    f"{better}/{len(learned)}"))
    return out


def render_report(records: Sequence[dict[str, Any]], header: dict[str, Any]) -> str:
    """The whole ``dsb.md``: header, Table 1, Table 2, all records, targets."""
    machines = []
    for r in records:
        m = r.get("machine")
        if isinstance(m, dict) and common.machine_line(m) not in machines:
            machines.append(common.machine_line(m))
    if not machines and header.get("machine"):
        machines.append(common.machine_line(header["machine"]))
    commands = sorted({r["harness_command"] for r in records if r.get("harness_command")})
    if not commands and header.get("command"):
        commands = [header["command"]]
    total = sum(float(r.get("wall_seconds") or r.get("train_seconds") or 0.0) for r in records)
    peaks = [r.get("peak_rss_mb") for r in records if isinstance(r.get("peak_rss_mb"), (int, float))]
    profiles = sorted({str(r.get("profile")) for r in records if r.get("profile")})
    plan = build_plan()
    done = {record_key(r) for r in records}
    n_done = sum(run.key in done for run in plan)

    lines = [
        "# DSB2018 (BBBC038) benchmark: Scribble2Label vs baselines",
        "",
        "Generated by `benchmarks/dsb.py` from `" + header.get("results_name", "dsb.json") + "`; do not edit by hand.",
        "",
        "- **Command(s):** " + ("; ".join(f"`{c}`" for c in commands) if commands else common.DASH),
        "- **Machine(s):** " + ("; ".join(machines) if machines else common.DASH),
        f"- **Profile(s):** {', '.join(profiles) if profiles else common.DASH}",
        *[f"  - `{p}`: {PROFILE_NOTES[p]}" for p in profiles if p in PROFILE_NOTES],
        f"- **Runs:** {n_done} of {len(plan)} planned have a record ({len(records)} records in all)",
        f"- **Total wall time** (training + both evaluations, summed over records): {total / 3600:.2f} h",
        f"- **Peak memory** (largest peak RSS of a process tree, MB): {common.fmt(max(peaks) if peaks else None, 0)}",
        f"- **Report written:** {header.get('date', common.now_iso())}",
        *([f"- **Other profiles:** {', '.join(f'`{n}`' for n in header['siblings'])} (same tables, other recipe)"]
          if header.get("siblings") else []),
        "",
        "Ours: mean over seeds (± sample std with ≥ 2 seeds), test split, connected-component instances (the paper's",
        "post-processing). The mDice in brackets is the CORRECT one (pooled over all nuclei); the paper's numbers use",
        "its own per-image variant, listed as `mDice (paper var.)` in the table of all records. `–`: no record yet.",
        "Paper numbers: Lee & Jeong, MICCAI 2020, Table 1 and Table 2 (restated in `docs/method.md`).",
        "",
        "## Table 1 style: DSB columns (30% scribbles; Full = full masks; Otsu = no learning)",
        "",
        table1(records),
        "",
        "## Table 2 style: DSB-Fluo, automatic scribbles at 10/30/50/100%",
        "",
        table2(records),
        "",
        "## All records",
        "",
        "cc = connected components (primary), ws = distance-transform watershed. Train s = training wall time;",
        "peak RSS = max over 0.5 s polls of the summed VmRSS of the training process and its children (for Otsu: of",
        "the evaluation); img/s = training patches (training images × patches per image × epochs) per second.",
        *_gpu_note(records, profiles),
        "",
        records_table(records),
        "",
        *record_notes(records),
        "## Targets (issue 3; DSB-Fluo test split, mean over seeds)",
        "",
    ]
    lines += common.markdown_table(["target", "status", "measured"],
                                   [list(t) for t in check_targets(records)], align=["l", "l", "l"]).splitlines()
    lines += [
        "",
        f"Where a target fails, `{analysis_name('fluorescence', profiles)}` (DSB-Fluo) and "
        f"`{analysis_name('<modality>', profiles)}` (written by",
        "`benchmarks/dsb_analysis.py` from the run folders) hold the measured reasons: pixel precision/recall and",
        "foreground area ratio of each run's test masks, the accuracy of the pseudo-labels in each Scribble2Label",
        "run's final EMA store against the full masks, and the class balance of the automatic scribbles.",
        "",
    ]
    return "\n".join(lines)


def write_report(results: Path, header: dict[str, Any]) -> Path:
    """Regenerate the markdown next to ``results`` (``dsb.json`` -> ``dsb.md``); return its path."""
    records = common.load_records(results)
    md = results.with_suffix(".md")
    siblings = sorted(f.name for f in results.parent.glob("dsb*.md")
                      if f.name != md.name and f.name.startswith(("dsb.", "dsb_")) and "analysis" not in f.name)
    common.write_text_atomic(md, render_report(records, {"results_name": results.name, "siblings": siblings,
                                                         **header}))
    return md


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


def ensure_data(
    zip_path: Path, data_dir: Path, modalities: Sequence[str], limit: int | None, workers: int
) -> list[str]:
    """Prepare BBBC038 into ``data_dir`` for ``modalities`` whose datalists are not all there yet.

    ``prepare_dsb2018`` is idempotent (existing files are kept) and writes the datalists last, so a modality with
    all of its datalists is complete and costs nothing here.

    Returns:
        The modalities prepared by this call.

    Raises:
        FileNotFoundError: data to prepare and no archive.
    """
    tags = [*(dsb_tag(r) for r in RATIOS), "full"]
    missing = [m for m in DATASETS if m in modalities
               and not all((data_dir / m / f"datalist_{t}.json").is_file() for t in tags)]
    if not missing:
        return []
    if not zip_path.is_file():
        raise FileNotFoundError(
            f"BBBC038 archive not found: {zip_path}\n"
            f"Download stage1_train.zip (Kaggle Data Science Bowl 2018, stage 1 training set) from {DOWNLOAD_URL} "
            "and pass it with --zip."
        )
    from s2l_monai.data.dsb2018 import prepare_dsb2018

    print(f"[dsb] preparing {', '.join(missing)} from {zip_path} into {data_dir} (once; limit={limit})", flush=True)
    prepare_dsb2018(zip_path, data_dir, ratios=RATIOS, seed=0, modalities=missing, limit=limit, workers=workers)
    return missing


def dsb_tag(ratio: float) -> str:
    """Folder tag of a ratio as ``prepare_dsb2018`` writes it (``0.3 -> "30"``)."""
    return str(round(ratio * 100))


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``benchmarks/dsb.py``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--zip", type=Path, default=DEFAULT_ZIP, help=f"stage1_train.zip (default {DEFAULT_ZIP})")
    p.add_argument("--work", type=Path, default=Path("/tmp/s2l_dsb"),
                   help="prepared data, checkpoints, predictions and logs (default /tmp/s2l_dsb)")
    p.add_argument("--profile", choices=sorted(PROFILES), default="cpu",
                   help="cpu: <= 10 min per training on 2 CPU cores; cpu-balanced: cpu + class-weighted scribble"
                        " loss; default: the bundle's defaults (GPU); paper: configs/paper.json (GPU)")
    p.add_argument("--only", nargs="+", default=None, metavar="MOD:RATIO:METHOD:SEED",
                   help="run only these, e.g. fluorescence:30:s2l:0 fluorescence:full:full:1 brightfield:full:otsu:-"
                        " ('*' matches anything)")
    p.add_argument("--max-runs", type=int, default=None, help="stop after this many runs (skipped ones not counted)")
    p.add_argument("--list", action="store_true", help="print the plan with done/pending and exit")
    p.add_argument("--report-only", action="store_true", help="only regenerate the markdown from the JSON")
    p.add_argument("--results", type=Path, default=None,
                   help="result JSON (default benchmarks/results/dsb.json; dsb_paper.json for --profile paper)")
    p.add_argument("--workers", type=int, default=2, help="processes for the data preparation (default 2)")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    return p


def default_results(profile: str, smoke: bool, work: Path) -> Path:
    """Where records go: the committed results for real runs, the work folder for smoke runs."""
    if smoke:
        return work / "results_smoke" / "dsb.json"
    return RESULTS_DIR / ("dsb.json" if profile == "cpu" else f"dsb_{profile}.json")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; exit status 0 when every attempted run succeeded, 1 otherwise, 2 on bad input."""
    args = build_parser().parse_args(argv)
    results = args.results or default_results(args.profile, args.smoke, args.work)
    harness_cmd = "python benchmarks/dsb.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    try:
        plan = select_plan(build_plan(), args.only)
        records = common.load_records(results)
    except ValueError as exc:
        print(f"dsb.py: error: {exc}", file=sys.stderr)
        return 2

    if args.list:
        done = {record_key(r) for r in records}
        for run in plan:
            print(f"{'done   ' if run.key in done else 'pending'}  {run.run_id}")
        print(f"{sum(r.key in done for r in plan)} of {len(plan)} done; results: {results}")
        return 0
    machine = common.machine_info()
    header = {"command": harness_cmd, "machine": machine}
    if args.report_only:
        print(f"[dsb] wrote {write_report(results, header)}")
        return 0

    data_dir = args.work / ("data_smoke" if args.smoke else "data")
    todo = pending_runs(plan, records)
    if args.max_runs is not None:
        todo_now = todo[: max(0, args.max_runs)]
    else:
        todo_now = todo
    try:
        ensure_data(args.zip.resolve(), data_dir, sorted({r.modality for r in todo_now}),
                    SMOKE_LIMIT if args.smoke else None, args.workers)
    except FileNotFoundError as exc:
        print(f"dsb.py: error: {exc}", file=sys.stderr)
        return 2

    print(f"[dsb] {len(plan) - len(todo)} of {len(plan)} selected runs already recorded in {results}; "
          f"{len(todo)} to do" + (f", {len(todo_now)} now (--max-runs)" if len(todo_now) < len(todo) else ""),
          flush=True)
    todo = todo_now
    context = {
        "profile": args.profile + ("+smoke" if args.smoke else ""),
        "machine": machine,
        "git_commit": common.git_commit(REPO_ROOT),
        "harness_command": harness_cmd,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", common.CHILD_ENV["OMP_WAIT_POLICY"]),
    }
    failed = []
    for i, run in enumerate(todo, 1):
        print(f"[dsb] ({i}/{len(todo)}) {run.run_id}", flush=True)
        try:
            record = execute_run(run, args.profile, data_dir, args.work, {**context, "date": common.now_iso()},
                                 smoke=args.smoke)
        except (RuntimeError, OSError, ValueError, KeyError) as exc:
            print(f"[dsb] FAILED {run.run_id}: {exc}", file=sys.stderr, flush=True)
            failed.append(run.run_id)
            continue
        added = common.append_record(results, record, KEY_FIELDS)
        print(f"[dsb] {run.run_id}: IoU {common.fmt(record['iou'])} mDice {common.fmt(record['mdice'])} "
              f"DSB {common.fmt(record['dsb_score'])}/{common.fmt(record['dsb_score_watershed'])} (cc/ws) "
              f"train {record['train_seconds']} s, peak RSS {record['peak_rss_mb']} MB"
              + ("" if added else " (a record with this key appeared meanwhile; kept the older one)"), flush=True)
        write_report(results, header)
    md = write_report(results, header)
    print(f"[dsb] results: {results}, report: {md}", flush=True)
    if failed:
        print(f"[dsb] {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
