"""A MONAI Label studies folder of real DSB2018 fluorescence images, read from ``stage1_train.zip``.

The images are copied byte for byte (RGBA PNG, as users download them), so the server sees what a user's folder
holds. Scribbles are the paper's automatic scribbles (:func:`s2l_monai.data.scribbles.auto_scribbles`) written in
MONAI Label's label encoding: 0 = nothing drawn, 2 = ``background_scribbles``, 3 = ``foreground_scribbles``.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from s2l_monai.data.dsb2018 import assemble_labels, image_rng
from s2l_monai.data.scribbles import auto_scribbles

__all__ = ["TEST_IDS", "TRAIN_IDS", "ground_truth", "iou", "make_studies", "scribble_label_png"]

# The first 8 (training) and 2 further (held out) fluorescence images of size 256x256 in sorted id order of
# stage1_train.zip (grey, mean < 100 as in s2l_monai.data.dsb2018.classify_modality). Fixed, so runs compare.
TRAIN_IDS: tuple[str, ...] = (
    "00071198d059ba7f5914a526d124d28e6d010c92466da21d4a04cd5413362552",
    "003cee89357d9fe13516167fd67b609a164651b21934585648c740d2c3d86dc1",
    "0280fa8f60f6bcae0f97d93c28f60be194f9309ff610dc5845e60455b0f87c21",
    "0287e7ee5b007c91ae2bd7628d09735e70496bc6127ecb7f3dd043e04ce37426",
    "03398329ced0c23b9ac3fac84dd53a87d9ffe4d9d10f1b5fe8df8fac12380776",
    "04acab7636c4cf61d288a5962f15fa456b7bde31a021e5deedfbf51288e4001e",
    "05040e2e959c3f5632558fc9683fec88f0010026c555b499066346f67fdd0e13",
    "05a8f65ebd0b30d3b210f30b4d640c847c2e710d0d135e0aeeaccbe1988e3b6e",
)
TEST_IDS: tuple[str, ...] = (
    "094afe36759e7daffe12188ab5987581d405b06720f1d5acf3f2614f404df380",
    "0a7d30b252359a10fd298b638b90cb9ada3acced4e0c0e5a3692013f432ee4e9",
)
#: MONAI Label's default values for a model with one label ("nucleus" = 1).
ML_UNLABELLED, ML_BACKGROUND, ML_FOREGROUND = 0, 2, 3


def make_studies(zip_path: Path, studies: Path, ids: tuple[str, ...] = TRAIN_IDS + TEST_IDS) -> None:
    """Copy the images ``<id>/images/<id>.png`` of ``ids`` into ``studies/<id>.png``."""
    studies.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(zip_path) as z:
        for image_id in ids:
            (studies / f"{image_id}.png").write_bytes(z.read(f"{image_id}/images/{image_id}.png"))


def ground_truth(zip_path: Path, image_id: str) -> np.ndarray:
    """The instance label map of an image (all its ``masks/*.png``)."""
    with zipfile.ZipFile(zip_path) as z:
        names = sorted(n for n in z.namelist() if n.startswith(f"{image_id}/masks/") and n.endswith(".png"))
        masks = [np.asarray(Image.open(io.BytesIO(z.read(n)))) > 0 for n in names]
    labels, _ = assemble_labels(masks)
    return labels


def scribble_label_png(zip_path: Path, image_id: str, ratio: float, seed: int = 0) -> bytes:
    """Automatic scribbles of an image as a MONAI Label label PNG (0 / 2 background / 3 foreground)."""
    scribbles = auto_scribbles(
        ground_truth(zip_path, image_id), ratio, image_rng(seed, image_id),
        background=ML_BACKGROUND, foreground=ML_FOREGROUND, unlabelled=ML_UNLABELLED,
    )
    buf = io.BytesIO()
    Image.fromarray(scribbles).save(buf, format="PNG")
    return buf.getvalue()


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Foreground IoU of two masks (anything > 0 is foreground)."""
    p, t = np.asarray(pred) > 0, np.asarray(truth) > 0
    union = np.count_nonzero(p | t)
    return float(np.count_nonzero(p & t) / union) if union else 1.0
