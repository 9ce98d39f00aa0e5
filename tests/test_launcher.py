"""``s2l train`` / ``s2l segment``: the bundle runs, launched with a passive OpenMP wait policy, no trust notice."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from reliability_cases import write_dataset

from s2l_monai.cli import bundle_command


def test_bundle_command_sets_the_wait_policy_and_keeps_a_users_choice(monkeypatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    cmd, env = bundle_command("training", "/x/configs/train.json", ["--max_steps", "5"])
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert cmd[-6:] == ["run", "training", "--config_file", "/x/configs/train.json", "--max_steps", "5"]
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert bundle_command("training", "c.json", [])[1]["OMP_WAIT_POLICY"] == "ACTIVE"


def test_s2l_train_then_segment_from_another_folder(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "data")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    s2l = [sys.executable, "-m", "s2l_monai"]
    train = subprocess.run([*s2l, "train", "--dataset_dir", str(data), "--max_steps", "3", "--num_workers", "0",
                            "--roi_size", "[64,64]", "--num_figures", "0"],
                           cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    log = train.stdout + train.stderr
    assert train.returncode == 0, log[-3000:]
    assert "source you trust" not in log and "training finished after 3 steps" in log
    assert (tmp_path / "models" / "model.pt").is_file()  # bundle_root "." is the caller's folder
    seg = subprocess.run([*s2l, "segment", "--input_dir", str(data / "images"), "--output_dir", "out"],
                         cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert seg.returncode == 0, (seg.stdout + seg.stderr)[-3000:]
    written = sorted(p.name for p in (tmp_path / "out").glob("*_instances.png"))
    assert written == [f"img{k}_instances.png" for k in range(3)]
