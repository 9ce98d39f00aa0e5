"""README command 1, as a new user runs it: ``s2l train`` with no option in an empty folder.

It generates the built-in synthetic set, trains the default recipe and ends with the evaluation of the synthetic
test split beside Otsu's threshold. The demo is there to show the method working, so the trained model must beat
the threshold on both the pixel IoU and the DSB instance score, and its log must hold nothing a user has to ignore.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_demo_trains_a_model_that_beats_otsu(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "PYTHONWARNINGS")}
    proc = subprocess.run([sys.executable, "-m", "s2l_monai", "train"], cwd=tmp_path, capture_output=True, text=True,
                          env=env, timeout=1800)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    report = json.loads((tmp_path / "runs" / "train" / "test_evaluation" / "comparison.json").read_text())
    model, otsu = report["model"], report["otsu"]
    assert model["iou"] >= otsu["iou"] + 0.02, report
    assert model["dsb"] >= otsu["dsb"] + 0.02, report
    # the last lines say how good it is and where the picture is
    assert re.search(r"this model IoU [\d.]+, DSB score [\d.]+; Otsu threshold IoU [\d.]+, DSB score [\d.]+\. "
                     r"Picture \(image \| scribbles \| model \| Otsu\): .*comparison\.png", log), log[-2000:]
    assert (tmp_path / "runs" / "train" / "test_evaluation" / "comparison.png").is_file()
    # quiet, honest output: no warning, no traceback, no MONAI notice, no per-epoch metric dump
    noisy = [line for line in log.splitlines()
             if re.search(r"WARNING|Warning|Traceback|source you trust|Key metric|Epoch\[\d+\] Metrics", line)]
    assert not noisy, noisy[:10]
