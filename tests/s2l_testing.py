"""Helpers shared by the test modules (imported by name; fixtures live in ``conftest.py``).

Kept out of ``conftest.py`` on purpose: pytest imports every ``conftest.py`` without a package as the module
``conftest``, so with ``tests/monailabel/conftest.py`` present, ``from conftest import ...`` would reach whichever
was loaded last.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("S2L_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


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
