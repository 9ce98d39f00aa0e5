from __future__ import annotations

from pathlib import Path

import pytest
from s2l_testing import SHARED_DATA


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
