"""The Scribble2Label bundle served by the app: where it lives and what its configs say."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

__all__ = ["BUNDLE_NAME", "LABELS", "ensure_bundle", "read_config"]

logger = logging.getLogger(__name__)

BUNDLE_NAME = "scribble2label"
#: The model's label (what inference returns as 1) for MONAI Label; scribbles get 2 and 3 by default.
LABELS: dict[str, int] = {"nucleus": 1}
#: The repository this app folder belongs to (its configs seed a new bundle folder).
REPO_ROOT = Path(__file__).resolve().parents[2]


def ensure_bundle(path: str | os.PathLike) -> Path:
    """Return the bundle folder; a missing one is created from the repository's ``configs/``.

    A zoo bundle extracted there (``scribble2label_v<V>.zip``, with ``models/model.pt``) is used as it is.

    Raises:
        FileNotFoundError: neither the folder nor the repository's configs exist.
    """
    bundle = Path(path).resolve()
    if (bundle / "configs" / "train.json").is_file():
        return bundle
    source = REPO_ROOT / "configs"
    if not (source / "train.json").is_file():
        raise FileNotFoundError(f"no bundle at {bundle} and no configs at {source} to make one")
    logger.info(f"Creating bundle folder {bundle} from {source}")
    (bundle / "models").mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, bundle / "configs", dirs_exist_ok=True)
    if (REPO_ROOT / "LICENSE").is_file():
        shutil.copy2(REPO_ROOT / "LICENSE", bundle / "LICENSE")
    return bundle


def read_config(bundle: Path, name: str, **overrides: Any) -> Any:
    """A ``ConfigParser`` of ``configs/<name>`` with ``bundle_root`` set to the bundle and ``overrides`` applied."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / name))
    parser["bundle_root"] = str(bundle)
    for key, value in overrides.items():
        parser[key] = value
    return parser
