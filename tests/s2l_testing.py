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


def changing_logits(foreground_logit):
    """A two-class network whose foreground logit is ``foreground_logit(x, k)`` on its ``k``-th call (from 1), so
    successive ensembles see different predictions; ``.calls`` counts the calls."""
    import torch

    class _ChangingLogits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0
            self.scale = torch.nn.Parameter(torch.ones(1))

        def forward(self, x):
            self.calls += 1
            fg = foreground_logit(x[:, :1], self.calls)
            return torch.cat([torch.zeros_like(fg), fg], 1)

    return _ChangingLogits()


def ensemble_items(n: int = 3, shape: tuple[int, int] = (20, 24), shift: float = 0.0) -> list[dict]:
    """``n`` training items for an ensemble: id, a normal-noise image (plus ``shift``) ``1HW`` and scribbles with
    background on the first two rows, the rest unlabelled (255)."""
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        scribble = np.full((1, *shape), 255, np.float32)
        scribble[0, :2] = 0
        image = rng.normal(size=(1, *shape)).astype(np.float32) + shift
        items.append({"id": f"img{i}", "image": torch.from_numpy(image), "scribble": torch.from_numpy(scribble)})
    return items
