"""DSB2018 (BBBC038) reproduction benchmark of Scribble2Label: the paper's Table 1 DSB columns and Table 2.

One headline result: the ``default`` profile trains every method with ``configs/train.json`` as it is (the
self-configuring recipe: a budget in optimiser steps, warm-up, ensemble interval and EMA memory as shares of the
run, class weights estimated from the scribbles) plus the method's own overrides, and writes
``benchmarks/results/dsb.json`` and ``dsb.md``. The GPU profiles (``paper``, ``paper-short``,
``paper-short-balanced``) write their own files. Results of retired recipes live in ``benchmarks/results/archive/``.

Resumable: every finished run appends one record to the result JSON (written atomically) and a rerun skips the
(dataset, ratio, method, seed) records already there; the markdown is regenerated after every run. See
``benchmarks/README.md``.

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
from collections.abc import Callable, Sequence
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
# Profiles
# --------------------------------------------------------------------------------------------------------------
#: ``default``: ``configs/train.json`` with no overrides at all (only the method's own, below): the recipe configures
#: itself from the data (steps, shares of the run, class weights estimated from the scribbles). The headline result,
#: meant for 2 CPU cores (each training <= 10 minutes, a target of the report).
DEFAULT_PROFILE: dict[str, Any] = {}
#: ``paper``: the authors' recipe from ``configs/paper.json`` (for a GPU), no further overrides.
PAPER_PROFILE: dict[str, Any] = {}
#: ``paper-short``: the authors' recipe (``configs/paper.json``: ResNet-50 U-Net, 256x256 crops, batch 30, lr 3e-4,
#: cosine warm restarts every 50 epochs, tau 0.8, alpha 0.2, an ensemble every 5 epochs) on a third of its schedule,
#: 100 epochs with 30 of warm-up (the paper: 300 and 100), to fit a 15-minute GPU lease with four runs sharing one
#: GPU and 16 CPU cores (3 loader workers each). Measured here: loading and augmenting one 256x256 training sample
#: takes 15-23 ms of one CPU core, so the loaders, not the GPU, set the pace. ``max_train_seconds`` ends a run when
#: its time is spent (the record holds the steps trained).
PAPER_SHORT_PROFILE: dict[str, Any] = {
    "max_epochs": 100, "warmup_epochs": 30, "max_train_seconds": 350, "num_workers": 3,
    "ensemble_whole_image": False,  # as measured (sliding-window ensembles)
}
#: Retired defaults, kept to re-run them. Their records stayed in dsb.json until every cell had a default record
#: (the report shows a default record where a cell has one, else these, marked with their profile); since
#: 2026-12-05 they are all in ``results/archive/dsb_default_retired_profiles.json`` (but ``default-lam1``, below).
#: ``default-nocrf``: the default before its CRF term (until 2026-12-02, batch 16), its Scribble2Label records;
#: ``default-b16``: the default with batch 16 (until 2026-12-03), the baselines' records (they turn the CRF off
#: themselves); ``default-pcw``: the default with
#: L_up weighted by the estimated class weights (``pseudo_class_weights "auto"``, until 2026-12-03), the records of
#: the methods that have an L_up (Scribble2Label, Pseudo-label); pCE, rLoss and Full have none, so their default
#: records stand as they are. ``default-1200``: the default with 1200 optimiser steps (until 2026-12-03), every
#: method's records. All of them ran 1200 steps, so each carries that budget. ``default-lam1``: the default with
#: ``lambda_up 1.0`` (the default on 2026-12-05 until bright-field validation showed its cost), the records of the
#: methods that have an L_up (Scribble2Label, Pseudo-label, S2L from the zoo weights); 2400 steps like the default;
#: they are in ``results/archive/dsb_default_lam1.json``. ``default-nodc``: the default before drift control
#: (``drift_control false``, the default until 2026-12-05), the records of the methods with an L_up (Scribble2Label,
#: Pseudo-label, S2L from the zoo weights); pCE, rLoss and Full have no L_up, so their default records stand.
S1200_PROFILE: dict[str, Any] = {"max_steps": 1200}
LAM1_PROFILE: dict[str, Any] = {"lambda_up": 1.0}
NODC_PROFILE: dict[str, Any] = {"drift_control": False}
#: ``default-l2``: the default with the 2-level UNet (channels 16-32-64, strides 2-2; the default network until
#: 2026-12-06, when bright-field validation chose a third level), every method's records. A profile's
#: ``network_def#...`` keys reach the evaluation too (:func:`network_overrides`).
L2_PROFILE: dict[str, Any] = {"network_def#channels": [16, 32, 64], "network_def#strides": [2, 2]}
#: ``default-argmax``: the default recipe read at the argmax (``calibrate_threshold false``: no calibrated foreground
#: threshold, the default until 2026-12-05). Its trainings are the default's (calibration runs after training).
ARGMAX_PROFILE: dict[str, Any] = {"calibrate_threshold": False}
NOCRF_PROFILE: dict[str, Any] = {**S1200_PROFILE, "crf_weight": 0.0, "batch_size": 16}
B16_PROFILE: dict[str, Any] = {**S1200_PROFILE, "batch_size": 16}
PCW_PROFILE: dict[str, Any] = {**S1200_PROFILE, "pseudo_class_weights": "auto"}
PROFILES: dict[str, dict[str, Any]] = {
    "default": DEFAULT_PROFILE,
    "default-nocrf": NOCRF_PROFILE,
    "default-b16": B16_PROFILE,
    "default-pcw": PCW_PROFILE,
    "default-1200": S1200_PROFILE,
    "default-lam1": LAM1_PROFILE,
    "default-nodc": NODC_PROFILE,
    "default-argmax": ARGMAX_PROFILE,
    "default-l2": L2_PROFILE,
    "paper": PAPER_PROFILE,
    "paper-short": PAPER_SHORT_PROFILE,
    "paper-short-balanced": {**PAPER_SHORT_PROFILE, "class_weights": [3.0, 1.0], "pseudo_class_weights": [3.0, 1.0],
                             "max_train_seconds": 190, "num_workers": 6},
}
#: One line per profile for the report header.
PROFILE_NOTES: dict[str, str] = {
    "default": "configs/train.json as it is, the self-configuring default recipe (no overrides besides the"
               " method's), every method from scratch (`pretrained_weights \"\"`, see `FROM_SCRATCH`); the headline"
               " result",
    "default-nocrf": "the default recipe before its CRF term (`crf_weight 0`, the default until 2026-12-02, commit"
                     " 217a045, batch 16); Scribble2Label rows measured with it, since replaced by the default's",
    "default-b16": "the default recipe with batch 16 instead of 12 (the default until 2026-12-03); baseline rows"
                   " measured with it, since replaced by the default's",
    "default-pcw": "the default recipe with the pseudo-label loss L_up weighted by the estimated class weights"
                   " (`pseudo_class_weights auto`, the default until 2026-12-03); Scribble2Label and Pseudo-label rows"
                   " measured with it, since replaced by the default's",
    "default-1200": "the default recipe with 1200 optimiser steps (`max_steps 1200`, the default until 2026-12-03);"
                    " rows measured with it, since replaced by the default's",
    "default-lam1": "the default recipe with the pseudo-label weight `lambda_up 1.0` (the default on 2026-12-05,"
                    " retired for its cost on bright-field); Scribble2Label and Pseudo-label rows measured with it",
    "default-nodc": "the default recipe before drift control (`drift_control false`, the default until 2026-12-05);"
                    " Scribble2Label and Pseudo-label rows measured with it, since replaced by the default's",
    "default-argmax": "the default recipe read at the argmax (`calibrate_threshold false`; the calibrated foreground"
                      " threshold is the default since 2026-12-05); rows measured with it, since replaced by the"
                      " default's",
    "default-l2": "the default recipe with the 2-level UNet (`network_def` channels [16, 32, 64], strides [2, 2]; the"
                  " default network until 2026-12-06); rows measured with it, since replaced by the default's",
    "paper": "configs/train.json + configs/paper.json, the authors' recipe (GPU)",
    "paper-short": "configs/paper.json (the authors' network, crops, batch, optimiser and tau/alpha/gamma) on 100"
                   " epochs with 30 of warm-up instead of 300/100 (`PAPER_SHORT_PROFILE` in dsb.py), for a GPU",
    "paper-short-balanced": "`paper-short` plus `class_weights [3, 1]`, `pseudo_class_weights [3, 1]`, 190 s of"
                            " training (a second, shorter call of one GPU lease)",
}
#: Profiles whose records compare across machines (the same recipe whatever the device; the schedule is in steps):
#: a record measured on a lent GPU machine keeps its quality figures, not its times (``em.py`` shares
#: :func:`_gpu_note`).
SAME_RECIPE_PROFILES: tuple[str, ...] = ("default", "default-nocrf", "default-b16", "default-pcw", "default-1200",
                                          "default-lam1", "default-nodc", "default-argmax", "default-l2")
PROFILE_CONFIGS: dict[str, list[str]] = {
    "default": ["configs/train.json"],
    "default-nocrf": ["configs/train.json"],
    "default-b16": ["configs/train.json"],
    "default-pcw": ["configs/train.json"],
    "default-1200": ["configs/train.json"],
    "default-lam1": ["configs/train.json"],
    "default-nodc": ["configs/train.json"],
    "default-argmax": ["configs/train.json"],
    "default-l2": ["configs/train.json"],
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
#: Every method but ``s2l_zoo`` trains from scratch. configs/train.json starts from the shipped weights where they
#: fit (``pretrained_weights auto``), but those are this benchmark's own DSB-Fluo Scribble2Label model: starting there
#: would fold one method's training on the DSB-Fluo training split into every method's run. The records before
#: ``auto`` (2026-12-05) trained from scratch too, with the same code path, so they stay valid.
FROM_SCRATCH: dict[str, Any] = {"pretrained_weights": ""}
#: Each baseline is an override of the same configs/train.json.
METHOD_OVERRIDES: dict[str, dict[str, Any]] = {
    "s2l": {**FROM_SCRATCH},  # Scribble2Label: the defaults
    # partial cross-entropy on the scribbles only; no pseudo-labels, so no ensembles are run (interval > the run)
    # (the paper's baselines have no CRF term: the default's crf_weight is turned off for them)
    "pce": {**FROM_SCRATCH, "lambda_up": 0, "ema_every": 100000, "crf_weight": 0.0},
    # threshold the latest prediction at tau, no averaging over time
    "pseudo": {**FROM_SCRATCH, "ema_alpha": 1.0, "crf_weight": 0.0},
    # rLoss (Tang et al. 2018): pCE plus the dense CRF regulariser of s2l_monai.losses.CRFLoss, with the weight the
    # default recipe uses (1.0, chosen on validation splits: docs/configuration.md, "Boundaries")
    "rloss": {**FROM_SCRATCH, "lambda_up": 0, "ema_every": 100000, "crf_weight": 1.0},
    # Scribble2Label fine-tuned from the shipped zoo weights (bundle/models/model.pt: the default recipe on DSB-Fluo
    # 30% scribbles): what configs/train.json does by default on grey images (`pretrained_weights auto`), measured on
    # a grey modality they were not trained on
    "s2l_zoo": {"pretrained_weights": "bundle/models/model.pt"},
    # full masks as scribbles everywhere (datalist_full.json); no ensembles either; unweighted (an unbiased sample)
    "full": {**FROM_SCRATCH, "lambda_up": 0, "ema_every": 100000, "class_weights": None,
             "pseudo_class_weights": None, "crf_weight": 0.0},
}
METHOD_LABELS: dict[str, str] = {
    "pce": "pCE only",
    "pseudo": "Pseudo-label",
    "rloss": "rLoss (CRF loss)",
    "s2l": "Scribble2Label",
    "s2l_zoo": "Scribble2Label, from the zoo weights",
    "full": "Full",
    "otsu": "Otsu (no learning)",
}
DATASETS: dict[str, str] = {"fluorescence": "dsb_fluo", "brightfield": "dsb_bf", "histopathology": "dsb_histo"}
MODALITY_OF: dict[str, str] = {v: k for k, v in DATASETS.items()}
DATASET_LABELS: dict[str, str] = {"dsb_bf": "DSB-BF", "dsb_fluo": "DSB-Fluo", "dsb_histo": "DSB-Histo"}
IN_CHANNELS: dict[str, int] = {"fluorescence": 1, "brightfield": 1, "histopathology": 3}
KEY_FIELDS: tuple[str, ...] = ("dataset", "ratio", "method", "seed", "profile")
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
    "rloss": {"dsb_bf": (0.7993, 0.7280), "dsb_fluo": (0.8334, 0.8394), "dsb_histo": (0.7873, 0.7177)},
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

# Targets of issue 14 (test split, mean over seeds, default recipe); see :func:`check_targets`.
TARGET_FLUO30_IOU = 0.854  # S2L at 30% scribbles on DSB-Fluo (paper Table 2: 0.8539)
TARGET_OTSU_MARGIN = 0.03  # S2L IoU at least this far above Otsu's on DSB-Fluo
TARGET_FLUO30_DSB_WATERSHED = 0.55  # S2L DSB score with watershed instances, DSB-Fluo 30%
TARGET_BF30_IOU = 0.80
TARGET_HISTO30_IOU = 0.80
TARGET_FLUO10_IOU = 0.83
TARGET_TRAIN_SECONDS = 600.0  # every training, 2 CPU cores


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
    """All runs, most important first (27 trainings plus 3 Otsu evaluations).

    Order: DSB-Fluo 30% S2L / pCE / Pseudo with seed 0, then seed 1, then seed 2 (the seed-std targets need two
    seeds of each); DSB-Fluo Full (seed 0) and Otsu; DSB-Fluo 10% S2L; DSB-BF 30% S2L / pCE / Pseudo / Full / Otsu;
    (DSB-BF also S2L fine-tuned from the zoo weights); DSB-Histo the same; rLoss on DSB-Fluo 30% (seed 0); last,
    DSB-Fluo 50% and 100% S2L / pCE / Pseudo (Table 2).
    """
    fl, bf, hi = "fluorescence", "brightfield", "histopathology"
    scribble_methods = ("s2l", "pce", "pseudo")
    plan: list[RunSpec] = []
    for seed in (0, 1, 2):
        plan += [RunSpec(fl, 0.3, m, seed) for m in scribble_methods]
    plan += [RunSpec(fl, None, "full", 0), RunSpec(fl, None, "otsu", None), RunSpec(fl, 0.1, "s2l", 0)]
    for modality in (bf, hi):
        plan += [RunSpec(modality, 0.3, m, 0) for m in scribble_methods]
        if modality == bf:  # grey like the zoo weights' DSB-Fluo (H&E is RGB: another input layer)
            plan.append(RunSpec(modality, 0.3, "s2l_zoo", 0))
        plan += [RunSpec(modality, None, "full", 0), RunSpec(modality, None, "otsu", None)]
    plan.append(RunSpec(fl, 0.3, "rloss", 0))
    for ratio in (0.5, 1.0):
        plan += [RunSpec(fl, ratio, m, 0) for m in scribble_methods]
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


def done_keys(records: Sequence[dict[str, Any]], profile: str) -> set[tuple[Any, ...]]:
    """The :func:`record_key` of the records made with ``profile`` (e.g. ``default``; ``default+smoke``): a record
    of another profile (a retired recipe kept in the same file) does not count as done."""
    return {record_key(r) for r in records if str(r.get("profile", "default")) == profile}


def pending_runs(plan: Sequence[RunSpec], records: Sequence[dict[str, Any]], profile: str = "default") -> list[RunSpec]:
    """The runs of ``plan`` without a record of ``profile`` yet."""
    done = done_keys(records, profile)
    return [r for r in plan if r.key not in done]


# --------------------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------------------


def _cli_value(value: Any) -> str:
    """An override value as the MONAI bundle CLI (python-fire) parses it back. ``None`` becomes the expression
    ``$None``: the bundle runner drops overrides whose value is None (``update_kwargs(ignore_none=True)``), so
    ``--class_weights None`` would leave the config's ``"auto"`` in place."""
    if value is None:
        return "$None"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _config_arg(files: Sequence[str]) -> str:
    return files[0] if len(files) == 1 else "[" + ",".join(f"'{f}'" for f in files) + "]"


def train_overrides(run: RunSpec, profile: str, smoke: bool = False) -> dict[str, Any]:
    """Bundle overrides of one training run: profile, method, smoke (later ones win). No per-modality overrides:
    the recipe sizes itself to each dataset (``configs/train.json``)."""
    over: dict[str, Any] = dict(PROFILES[profile])
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
        "--test_evaluation", "false",  # evaluated below, outside the timed training
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
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", eval_run_id(),
        "--config_file", _config_arg(files),
        "--dataset_dir", str(dataset_dir),
        "--datalist_name", run.datalist_name,
        "--ckpt_path", str(ckpt),
        "--output_dir", str(out_dir),
        "--instance_method", instance_method,
        "--in_channels", str(IN_CHANNELS[run.modality]),
    ]
    for key, value in network_overrides(PROFILES[profile]).items():
        cmd += [f"--{key}", _cli_value(value)]
    return cmd


def network_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """The ``network_def`` keys of a profile's training overrides (e.g. ``default-l2``'s), which the evaluation of
    its models needs as well: ``configs/inference.json`` builds the default network otherwise."""
    return {k: v for k, v in overrides.items() if k.split("#")[0] == "network_def"}


def calibrate_command(run: RunSpec, dataset_dir: Path, ckpt: Path) -> list[str]:
    """``python -m s2l_monai calibrate ...``: the foreground threshold of a training that finished before training
    calibrated it itself (see ``common.ensure_calibration``)."""
    return [sys.executable, "-m", "s2l_monai", "calibrate", "--ckpt", str(ckpt), "--dataset_dir", str(dataset_dir),
            "--datalist_name", run.datalist_name, "--in_channels", str(IN_CHANNELS[run.modality])]


def calibrate_for_evaluation(run: RunSpec, profile: str, dataset_dir: Path, ckpt: Path, log: Path | None,
                             smoke: bool = False) -> tuple[float, float]:
    """Make a model's calibration match its recipe before it is evaluated (``common.ensure_calibration``).

    Returns:
        ``(foreground_threshold, refine_weight)`` that the evaluation will read.
    """
    from s2l_monai.inference_io import as_bool

    cfg = _effective_config(profile, train_overrides(run, profile, smoke))
    # s2l calibrate builds configs/train.json's network: not another profile's (its training calibrated itself)
    own_network = PROFILE_CONFIGS[profile] == ["configs/train.json"] and not network_overrides(PROFILES[profile])
    threshold = common.ensure_calibration(
        ckpt, as_bool(cfg.get("calibrate_threshold", True)), calibrate_command(run, dataset_dir, ckpt), REPO_ROOT,
        log, can_calibrate=own_network,
        refine_weight=float(cfg.get("refine_weight", 2.0)))
    return threshold, common.calibrated_refinement(ckpt)


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
    """Top-level keys of the profile's config files with ``overrides`` applied (plain values only; an override
    ``a#b`` sets key ``b`` of the dictionary ``a``, as the bundle CLI does)."""
    cfg: dict[str, Any] = {}
    for name in PROFILE_CONFIGS[profile]:
        cfg.update(json.loads((REPO_ROOT / name).read_text()))
    for key, value in overrides.items():
        *parents, leaf = key.split("#")
        node = cfg
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return cfg


def _trainer_state(ckpt_dir: Path) -> tuple[int | None, int | None, int | None]:
    """``(iteration, epoch_length, epoch)`` of the trainer state in ``checkpoint_final.pt``, ``None`` where unknown.

    ignite's ``state_dict`` holds ``iteration`` and ``epoch_length`` (and sometimes ``epoch``); the iteration is
    the number of optimiser steps trained, also when a budget ended the run mid-epoch.
    """
    path = ckpt_dir / "checkpoint_final.pt"
    if not path.is_file():
        return None, None, None
    try:
        import torch

        state = torch.load(path, map_location="cpu", weights_only=False).get("trainer", {})
        iteration = int(state["iteration"])
        epoch_length = int(state["epoch_length"]) if state.get("epoch_length") else None
        epoch = int(state["epoch"]) if state.get("epoch") is not None else None
        return iteration, epoch_length, epoch
    except Exception:  # noqa: BLE001 - fall back to the configured budget
        return None, None, None


def _trained_epochs(ckpt_dir: Path) -> tuple[int | None, int | None]:
    """(completed epochs, iterations) from the trainer state in ``checkpoint_final.pt``, or ``(None, None)``."""
    iteration, epoch_length, epoch = _trainer_state(ckpt_dir)
    if iteration is None:
        return None, None
    return (epoch if epoch is not None else iteration // max(1, epoch_length or 1)), iteration


def training_volume(n_train: int, cfg: dict[str, Any], steps: int | None, epoch_length: int | None
                    ) -> dict[str, Any]:
    """Steps, epochs (fractional: a step budget ends mid-epoch) and training patches of one training.

    ``steps`` and ``epoch_length`` come from the final trainer state; without them (no checkpoint state) the
    configured budget is assumed: ``max_epochs`` epochs if set, else ``max_steps`` steps. One step loads
    ``batch_size // num_samples`` images (at least 1) and draws ``num_samples`` patches from each; an epoch is
    ``ceil(n_train / images per step)`` steps, its last one shorter.
    """
    num_samples = int(cfg.get("num_samples") or 1)
    per_step = max(1, int(cfg.get("batch_size") or 1) // num_samples)
    spe = epoch_length or max(1, math.ceil(n_train / per_step))
    if steps is None:
        if isinstance(cfg.get("max_epochs"), (int, float)):
            steps = int(cfg["max_epochs"]) * spe
        elif isinstance(cfg.get("max_steps"), (int, float)):
            steps = int(cfg["max_steps"])
    if steps is None:
        return {"steps": None, "epochs": None, "patches": None}
    full, rest = divmod(int(steps), spe)
    images = full * n_train + rest * per_step
    return {"steps": int(steps), "epochs": round(steps / spe, 2), "patches": images * num_samples}


def read_class_prior(run_dir: Path) -> dict[str, Any] | None:
    """``train/class_prior.json`` of a run folder (written when ``class_weights`` is ``"auto"``), or ``None``."""
    path = run_dir / "train" / "class_prior.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


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
    for key in ("n_train_images", "steps", "epochs", "iterations", "patches", "class_prior", "overrides",
                "foreground_threshold", "refine_weight", "reevaluated", "eval_seconds", "wall_seconds"):
        if key in train:
            rec[key] = train[key]
    rec.update(context)
    rec["command"] = train.get("command")
    return rec


def runs_dir(work: Path, profile: str) -> Path:
    """Run folders of a profile under ``work`` (``runs_<profile>``), so no profile reuses another's training (the
    retired CPU profiles trained in ``runs`` and ``runs_cpu-*``)."""
    return work / f"runs_{profile}"


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
            train["reevaluated"] = True  # this record's evaluation is new, its training an earlier one
            prior = read_class_prior(run_dir)
            if prior is not None:
                train.setdefault("class_prior", prior)
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
            iteration, epoch_length, _ = _trainer_state(run_dir / "ckpt")
            volume = training_volume(n_train, cfg, iteration, epoch_length)
            patches = volume["patches"]
            train = {
                "train_seconds": round(res.seconds, 1),
                "peak_rss_mb": res.peak_rss_mb,
                "images_per_second": round(patches / res.seconds, 2) if patches and res.seconds > 0 else None,
                "n_train_images": n_train,
                **volume,
                "overrides": overrides,
                "command": _quote(cmd),
            }
            prior = read_class_prior(run_dir)
            if prior is not None:
                train["class_prior"] = prior
            common.write_json_atomic(meta_path, train)
        train["foreground_threshold"], train["refine_weight"] = calibrate_for_evaluation(
            run, profile, dataset_dir, ckpt, log, smoke)
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
    return common.current_recipe([
        r for r in records
        if r.get("dataset") == dataset and r.get("method") == method
        and (None if r.get("ratio") is None else round(float(r["ratio"]), 6)) == r_key
    ])


def _stat(records: Sequence[dict[str, Any]], key: str) -> tuple[float | None, float | None, int]:
    return common.mean_std(r.get(key) for r in records)


def ours_cell(records: Sequence[dict[str, Any]]) -> str:
    """``IoU [mDice]`` as mean over seeds, ``±std`` with 2 or more seeds, ``(n=k)``; ``–`` without records."""
    if not records:
        return common.DASH
    iou, iou_sd, n = _stat(records, "iou")
    md, md_sd, _ = _stat(records, "mdice")
    cell = f"{common.fmt(iou, 4, iou_sd)} [{common.fmt(md, 4, md_sd)}]"
    cell += f" (n={n})" if n >= 2 else ""
    # records of another recipe than the headline default say so (e.g. `default-nocrf`, before the CRF term)
    others = sorted({str(r.get("profile")).split("+")[0] for r in records} - {"default"})
    return cell + (f" `{', '.join(others)}`" if others else "")


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
    for method in ("pce", "pseudo", "rloss", "s2l", "s2l_zoo", "full", "otsu"):
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
    """Every record, in plan order, with the instance metrics, the training volume and the costs."""
    plan_keys = {r.key: i for i, r in enumerate(build_plan())}
    headers = ["dataset", "ratio", "method", "seed", "IoU", "mDice", "mDice (paper var.)", "DSB cc", "DSB ws",
               "PQ cc", "PQ ws", "AJI", "F1@0.5", "steps", "class w.", "thr.", "train s", "peak RSS MB", "img/s",
               "profile", "ran on"]
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
            common.fmt(r["steps"] if r.get("steps") is not None else r.get("iterations"), 0),
            class_weights_cell(r),
            threshold_cell(r),
            common.fmt(r.get("train_seconds"), 0),
            common.fmt(r.get("peak_rss_mb"), 0),
            common.fmt(r.get("images_per_second"), 1),
            r.get("profile", common.DASH),
            ran_on(r.get("machine")),
        ])
    return common.markdown_table(headers, rows, align=["l", "r", "l", "r"] + ["r"] * (len(headers) - 4))


def threshold_cell(record: dict[str, Any]) -> str:
    """The foreground threshold the record's evaluation read its model at: calibrated (``s2l_monai.calibration``),
    0.5 for records from before calibration (the argmax), ``–`` for Otsu; `` +CRF`` where the probabilities were
    refined first (``refine_weight``, :func:`s2l_monai.crf.mean_field_refine`)."""
    if record.get("method") == "otsu":
        return common.DASH
    value = record.get("foreground_threshold")
    text = "0.5" if value is None else f"{float(value):g}"
    return text + " +CRF" if (record.get("refine_weight") or 0) > 0 else text


def _weights_text(weights: Any) -> str | None:
    if isinstance(weights, (list, tuple)) and weights and all(
            isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
        return "[" + ", ".join(f"{w:g}" for w in weights) + "]"
    return None


def class_weights_cell(record: dict[str, Any]) -> str:
    """The class weights ``[background, foreground]`` of a record's scribble loss: ``auto [w, 1]`` when they were
    estimated from the scribbles (``train/class_prior.json``), the overridden list, ``none`` when overridden to
    null (unweighted), else ``–`` (Otsu; or the config's value, not recorded)."""
    prior = record.get("class_prior")
    if isinstance(prior, dict) and _weights_text(prior.get("class_weights")):
        return "auto " + str(_weights_text(prior["class_weights"]))
    overrides = record.get("overrides")
    if isinstance(overrides, dict) and "class_weights" in overrides:
        return _weights_text(overrides["class_weights"]) or ("none" if overrides["class_weights"] is None
                                                             else str(overrides["class_weights"]))
    return common.DASH


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
    if any(p in SAME_RECIPE_PROFILES for p in profiles):
        return ["Records that ran on the lent GPU machine use the same recipe (same steps, patches and",
                "hyper-parameters), so their quality figures compare; their times and memory do not (several runs"
                " shared it)."]
    return ["Records that ran on a GPU machine shared it with the other runs of the same call (see the profile"
            " note), so their times and memory are not those of a run alone."]


def analysis_name(modality: str, profiles: Sequence[str], ratio: str = "30") -> str:
    """File name of the ``dsb_analysis.py`` report of a modality, scribble ratio tag and profile (the one naming
    rule: ``dsb_analysis.py`` writes to it, the reports point to it). Several profiles, or none: the ``default``
    profile's name."""
    suffix = f"_{profiles[0]}" if len(profiles) == 1 and profiles[0] != "default" else ""
    base = "dsb_analysis" if (modality, ratio) == ("fluorescence", "30") else f"dsb_analysis_{modality}_{ratio}"
    return base + suffix + ".md"


NOT_MEASURED = "not yet measured"  # em.py's targets use it
PENDING = "– pending"  # a target of this report whose records are missing


def _passfail(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _record_id(r: dict[str, Any]) -> str:
    ratio = r.get("ratio")
    seed = r.get("seed")
    return (f"{DATASET_LABELS.get(r.get('dataset'), r.get('dataset'))} "
            f"{'full' if ratio is None else format(float(ratio), '.0%')} {r.get('method')}"
            f"{'' if seed is None else f' s{seed}'}")


def _iou_target(records: Sequence[dict[str, Any]], dataset: str, ratio: float, threshold: float
                ) -> tuple[str, str, str]:
    """S2L IoU (mean over seeds) of ``dataset`` at ``ratio`` at least ``threshold``."""
    name = f"{DATASET_LABELS[dataset]} {ratio:.0%}: S2L IoU ≥ {threshold}"
    iou, sd, n = _stat(_select(records, dataset, "s2l", ratio), "iou")
    if iou is None:
        return name, PENDING, f"no S2L {DATASET_LABELS[dataset]} {ratio:.0%} record"
    return name, _passfail(iou >= threshold), f"IoU {common.fmt(iou, 4, sd)} (mean of {n} seed(s))"


def seed_std_lead(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]], key: str = "iou"
                  ) -> tuple[float, float] | None:
    """``(lead, std)``: mean of ``a`` minus mean of ``b``, and the larger of the two sample standard deviations over
    seeds; ``None`` unless both have at least 2 finite values (a std needs two seeds)."""
    ma, sa, na = _stat(a, key)
    mb, sb, nb = _stat(b, key)
    if na < 2 or nb < 2 or ma is None or mb is None or sa is None or sb is None:
        return None
    return ma - mb, max(sa, sb)


def _lead_target(s2l: Sequence[dict[str, Any]], other: Sequence[dict[str, Any]], label: str
                 ) -> tuple[str, str, str]:
    name = f"DSB-Fluo 30%: S2L IoU above {label} by more than one seed-std"
    ms, ss, ns = _stat(s2l, "iou")
    mo, so, no = _stat(other, "iou")
    lead = seed_std_lead(s2l, other)
    if lead is None:
        return name, PENDING, f"seeds with a record: S2L {ns}, {label} {no} (≥ 2 each needed)"
    diff, std = lead
    return name, _passfail(diff > std), (f"S2L {common.fmt(ms, 4, ss)} (n={ns}) − {label} {common.fmt(mo, 4, so)} "
                                         f"(n={no}) = {diff:+.4f}; larger seed-std {std:.4f}")


def time_target(
    trained: Sequence[dict[str, Any]],
    planned_keys: Sequence[tuple[Any, ...]],
    key: Callable[[dict[str, Any]], tuple[Any, ...]],
    name_of: Callable[[dict[str, Any]], str],
) -> tuple[str, str, str]:
    """Every training record measured on a CPU machine within :data:`TARGET_TRAIN_SECONDS` (shared with em.py).

    Args:
        trained: the training records (train_seconds a number).
        planned_keys: the record keys of the planned trainings.
        key: a record's key; name_of: a record's short name for the report.
    """
    name = f"Every training ≤ {TARGET_TRAIN_SECONDS:.0f} s (2 CPU cores)"
    on_gpu = [r for r in trained if isinstance(r.get("machine"), dict) and r["machine"].get("gpu")]
    on_cpu = [r for r in trained if r not in on_gpu]
    done = {key(r) for r in on_cpu}
    extra = [f"{sum(k in done for k in planned_keys)} of {len(planned_keys)} planned trainings recorded"]
    if on_gpu:
        extra.append(f"{len(on_gpu)} record(s) measured on a GPU machine not counted")
    if not on_cpu:
        return name, PENDING, "no training record measured on a CPU; " + "; ".join(extra)
    worst = max(on_cpu, key=lambda r: float(r["train_seconds"]))
    cores = sorted({str(r["machine"].get("cores", "?")) for r in on_cpu if isinstance(r.get("machine"), dict)})
    detail = (f"max {float(worst['train_seconds']):.0f} s ({name_of(worst)}) over {len(on_cpu)} training(s)"
              + (f" on {'/'.join(cores)} cores" if cores else ""))
    over = [r for r in on_cpu if float(r["train_seconds"]) > TARGET_TRAIN_SECONDS]
    if over:
        detail += "; over: " + ", ".join(f"{name_of(r)} {float(r['train_seconds']):.0f} s" for r in over)
    return name, _passfail(not over), detail + "; " + "; ".join(extra)


def _is_seconds(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _time_target(records: Sequence[dict[str, Any]]) -> tuple[str, str, str]:
    """Times the records the tables show: per cell (dataset, ratio, method) those of the headline recipe where it has
    any (:func:`common.current_recipe`), so a retired profile's slow run no longer counts once the default has
    re-measured its cell."""
    cells: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in records:
        if r.get("method") != "otsu":
            cells.setdefault(record_key(r)[:3], []).append(r)
    trained = [r for cell in cells.values() for r in common.current_recipe(cell) if _is_seconds(r.get("train_seconds"))]
    planned = [run.key for run in build_plan() if run.method != "otsu"]
    return time_target(trained, planned, record_key, _record_id)


def check_targets(records: Sequence[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """The targets of issue 14 (test split, means over seeds): ``(target, PASS|FAIL|– pending, measured)``.

    DSB-Fluo 30%: S2L IoU ≥ 0.854; S2L IoU ≥ Otsu IoU + 0.03; S2L watershed DSB score ≥ 0.55; S2L IoU above pCE-only
    and above Pseudo-label by more than one seed-std (the larger sample std over seeds of the two methods compared;
    pending until each has 2 seeds). DSB-BF 30% and DSB-Histo 30%: S2L IoU ≥ 0.80; DSB-Fluo 10%: S2L IoU ≥ 0.83.
    Every training (records measured on a CPU) within 600 s.
    """
    out: list[tuple[str, str, str]] = []
    s2l30 = _select(records, "dsb_fluo", "s2l", 0.3)
    out.append(_iou_target(records, "dsb_fluo", 0.3, TARGET_FLUO30_IOU))

    name = f"DSB-Fluo 30%: S2L IoU ≥ Otsu IoU + {TARGET_OTSU_MARGIN}"
    iou, sd, n = _stat(s2l30, "iou")
    otsu, _, n_o = _stat(_select(records, "dsb_fluo", "otsu", None), "iou")
    if iou is None or otsu is None:
        out.append((name, PENDING, f"records: S2L {n}, Otsu {n_o}"))
    else:
        out.append((name, _passfail(iou >= otsu + TARGET_OTSU_MARGIN),
                    f"S2L {common.fmt(iou, 4, sd)} (n={n}) vs Otsu {otsu:.4f} + {TARGET_OTSU_MARGIN} = "
                    f"{otsu + TARGET_OTSU_MARGIN:.4f}"))

    name = f"DSB-Fluo 30%: S2L DSB score (watershed) ≥ {TARGET_FLUO30_DSB_WATERSHED}"
    ws, ws_sd, n_ws = _stat(s2l30, "dsb_score_watershed")
    if ws is None:
        out.append((name, PENDING, "no S2L DSB-Fluo 30% record with a watershed evaluation"))
    else:
        out.append((name, _passfail(ws >= TARGET_FLUO30_DSB_WATERSHED),
                    f"DSB score {common.fmt(ws, 4, ws_sd)} (mean of {n_ws} seed(s))"))

    out.append(_lead_target(s2l30, _select(records, "dsb_fluo", "pce", 0.3), "pCE-only"))
    out.append(_lead_target(s2l30, _select(records, "dsb_fluo", "pseudo", 0.3), "Pseudo-label"))
    out.append(_iou_target(records, "dsb_bf", 0.3, TARGET_BF30_IOU))
    out.append(_iou_target(records, "dsb_histo", 0.3, TARGET_HISTO30_IOU))
    out.append(_iou_target(records, "dsb_fluo", 0.1, TARGET_FLUO10_IOU))
    out.append(_time_target(records))
    return out


#: Keys of the recipe line in the report header, each with the override that replaces it when set.
RECIPE_KEYS: tuple[tuple[str, str | None], ...] = (
    ("max_steps", "max_epochs"), ("max_epochs", None), ("max_train_seconds", None), ("batch_size", None),
    ("num_samples", None), ("roi_size", None), ("learning_rate", None), ("warmup_share", "warmup_epochs"),
    ("warmup_epochs", None), ("ensemble_share", "ema_every"), ("ema_every", None), ("ema_memory_share", "ema_alpha"),
    ("ema_alpha", None), ("tau", None), ("lambda_up", None), ("class_weights", None), ("pseudo_class_weights", None),
    ("drift_control", None),
    ("crf_weight", None), ("refine_weight", None), ("precision", None),
)


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def derived_ema_alpha(cfg: dict[str, Any]) -> float | None:
    """The EMA weight the schedule derives from a config's shares, or from ``ema_every`` over ``max_epochs`` (an
    epoch override); ``None`` where it depends on the epoch length (``ema_every`` with a step budget)."""
    if cfg.get("ema_every") is not None and cfg.get("max_epochs") is None:
        return None
    try:
        from s2l_monai.schedule import TrainingSchedule

        return TrainingSchedule(steps_per_epoch=1, max_steps=1, max_epochs=cfg.get("max_epochs"),
                                ensemble_interval=float(cfg["ensemble_share"]), ema_every=cfg.get("ema_every"),
                                ema_memory=float(cfg["ema_memory_share"]), ema_alpha=cfg.get("ema_alpha")).ema_alpha
    except Exception:  # noqa: BLE001 - a report line, never a reason to fail
        return None


#: The legend of the all-records table (shared with em.py, whose records have the same columns).
RECORDS_LEGEND: tuple[str, ...] = (
    "cc = connected components (primary), ws = distance-transform watershed. steps = optimiser steps trained",
    "(final trainer state); class w. = class weights [background, foreground] of the scribble loss: `auto [...]`",
    "estimated from the scribbles at the start (`train/class_prior.json`), a list = given, `none` = unweighted;",
    "thr. = foreground threshold the model was read at (calibrated after training from the training images' edges,",
    "`s2l_monai.calibration`; 0.5 = the argmax); +CRF: the probabilities were first refined against the image by",
    "three mean-field CRF steps (`refine_weight`, `s2l_monai.crf`), as the default inference does.",
    "Train s = training wall time; peak RSS = max over 0.5 s polls of the summed VmRSS of the training process and",
    "its children (for Otsu: of the evaluation); img/s = training patches (steps × patches per step) per second.",
)


def recipe_parts(cfg: dict[str, Any]) -> list[str]:
    """The recipe keys of an effective config (``RECIPE_KEYS``, the network, the derived EMA weight), as text."""
    parts = []
    net = cfg.get("network_def")
    if isinstance(net, dict) and net.get("_target_"):
        detail = net.get("backbone") or net.get("channels")
        parts.append(f"network {net['_target_']}" + ("" if detail is None else f" {_show(detail)}"))
    for key, replaced_by in RECIPE_KEYS:
        value = cfg.get(key)
        if key not in cfg or (replaced_by and cfg.get(replaced_by) is not None):
            continue
        if value is None and key not in ("class_weights", "pseudo_class_weights"):
            continue
        part = f"{key} {_show(value)}"
        if key == "ema_memory_share":
            alpha = derived_ema_alpha(cfg)
            part += "" if alpha is None else f" (ema_alpha {alpha:.3f})"
        parts.append(part)
    return parts


def recipe_line(profile: str) -> str:
    """The recipe of a profile in one line, read from its config files (and the profile's overrides) now."""
    try:
        cfg = _effective_config(profile, PROFILES.get(profile, {}))
    except (OSError, ValueError) as exc:
        return f"(configs not readable: {exc})"
    return ", ".join(f"`{p}`" for p in recipe_parts(cfg))


def _recipe_header(profiles: Sequence[str]) -> list[str]:
    lines = []
    for p in profiles:
        if p not in PROFILES:
            continue
        source = " + ".join(PROFILE_CONFIGS[p]) + (" + the profile's overrides" if PROFILES[p] else "")
        lines.append(f"- **{'Default recipe' if p == 'default' else f'Recipe of `{p}`'}** ({source} at report time;"
                     f" each record's `git_commit` names the code it ran; methods add `METHOD_OVERRIDES`): "
                     + recipe_line(p))
    return lines


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
    if not profiles and header.get("profile"):
        profiles = [str(header["profile"])]
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
        *_recipe_header(profiles),
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
        "Paper numbers: Lee & Jeong, MICCAI 2020, Table 1 and Table 2 (restated in `docs/method.md`). rLoss = pCE",
        "plus a dense CRF loss (`crf_weight`), planned on DSB-Fluo 30% only.",
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
        *RECORDS_LEGEND,
        *_gpu_note(records, profiles),
        "",
        records_table(records),
        "",
        *record_notes(records),
        "## Targets (issue 14; test split, mean over seeds, default recipe)",
        "",
        "`– pending`: the records a target needs are missing. Seed-std rule: the lead of S2L over a baseline must",
        "exceed the larger of the two methods' sample standard deviations over seeds (2 seeds each at least).",
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
        "run's final EMA store against the full masks, the class balance of the automatic scribbles and the class",
        "prior each run estimated.",
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
    p.add_argument("--profile", choices=sorted(PROFILES), default="default",
                   help="default: configs/train.json as it is (the headline result, <= 10 min per training on 2"
                        " CPU cores); paper: configs/paper.json (GPU); paper-short(-balanced): a third of it (GPU)")
    p.add_argument("--only", nargs="+", default=None, metavar="MOD:RATIO:METHOD:SEED",
                   help="run only these, e.g. fluorescence:30:s2l:0 fluorescence:full:full:1 brightfield:full:otsu:-"
                        " ('*' matches anything)")
    p.add_argument("--max-runs", type=int, default=None, help="stop after this many runs (skipped ones not counted)")
    p.add_argument("--list", action="store_true", help="print the plan with done/pending and exit")
    p.add_argument("--report-only", action="store_true", help="only regenerate the markdown from the JSON")
    p.add_argument("--results", type=Path, default=None,
                   help="result JSON (default benchmarks/results/dsb.json; dsb_<profile>.json for the others)")
    p.add_argument("--workers", type=int, default=2, help="processes for the data preparation (default 2)")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    return p


def default_results(profile: str, smoke: bool, work: Path) -> Path:
    """Where records go: the committed results for real runs, the work folder for smoke runs."""
    if smoke:
        return work / "results_smoke" / "dsb.json"
    return RESULTS_DIR / ("dsb.json" if profile == "default" else f"dsb_{profile}.json")


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

    run_profile = args.profile + ("+smoke" if args.smoke else "")
    if args.list:
        done = done_keys(records, run_profile)
        for run in plan:
            print(f"{'done   ' if run.key in done else 'pending'}  {run.run_id}")
        print(f"{sum(r.key in done for r in plan)} of {len(plan)} done; results: {results}")
        return 0
    machine = common.machine_info()
    header = {"command": harness_cmd, "machine": machine, "profile": args.profile}
    if args.report_only:
        print(f"[dsb] wrote {write_report(results, header)}")
        return 0

    data_dir = args.work / ("data_smoke" if args.smoke else "data")
    todo = pending_runs(plan, records, run_profile)
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
        "profile": run_profile,
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
