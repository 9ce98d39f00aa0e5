from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("S2L_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real-data folder (``../shared/data``); tests using it skip with a message where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (set S2L_SHARED_DATA to point at it)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def dsb_zip(shared_data: Path) -> Path:
    path = shared_data / "bbbc038" / "stage1_train.zip"
    if not path.is_file():
        pytest.skip(f"{path} is absent: download stage1_train.zip from https://bbbc.broadinstitute.org/BBBC038")
    return path


def default_network():
    """The network of ``configs/train.json`` (``network_def``), so tests follow the shipped configuration."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / "configs" / "train.json"))
    return parser.get_parsed_content("network_def")


def run_bundle(run_id: str, config: str, *overrides: str):
    """Run ``python -m monai.bundle run RUN_ID --config_file CONFIG ...`` from the repository root; assert success."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config, *overrides]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc
