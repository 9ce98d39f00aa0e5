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
