"""A local datastore that checks a label before it stores it.

MONAI Label's :class:`~monailabel.datastore.local.LocalDatastore` copies whatever is uploaded to
``labels/<tag>/<image id><ext>``: a tag such as ``../../x`` writes outside the studies folder, and a label of the
wrong size is only noticed when training fails; a corrupt or NaN image is only noticed when a task reads it. Here
every upload (image or label) is checked first and refused with an HTTP 4xx and a message that says what is wrong:
unsafe names, unreadable files, NaN or infinite pixels, a label whose shape differs from its image's or that holds
values no segment declares, an upload over ``max_upload_mb`` (app option, default 1024). A refused upload leaves
the datastore unchanged.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import numpy as np
from fastapi import HTTPException
from monailabel.datastore.local import LocalDatastore

from lib.bundle_config import LABELS
from lib.image_io import read_image, read_label
from lib.scribble_labels import default_label_values, label_values_named

__all__ = ["DEFAULT_MAX_UPLOAD_MB", "ScribbleDatastore", "check_name"]

logger = logging.getLogger(__name__)

#: Tags and image ids: letters, digits, ``.``, ``_``, ``-`` (no path separators, no ``..``).
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,199}$")
_LABEL_EXTENSIONS = (".png", ".tif", ".tiff", ".nii", ".nii.gz", ".nrrd", ".mha")
#: Largest accepted upload, in MiB (app option ``--conf max_upload_mb N``).
DEFAULT_MAX_UPLOAD_MB = 1024.0


def check_name(kind: str, value: str) -> None:
    """Refuse (HTTP 400) an image id or tag that could leave its folder.

    Raises:
        HTTPException: 400, with the reason.
    """
    if not isinstance(value, str) or not _SAFE_NAME.match(value) or ".." in value:
        raise HTTPException(
            status_code=400,
            detail=f"refused: {kind} {value!r} is not a plain name (letters, digits, '.', '_', '-'; no path "
            "separators or '..')",
        )


def _refuse(status: int, detail: str) -> HTTPException:
    return HTTPException(status_code=status, detail=f"refused: {detail}")


def _nonfinite(array: np.ndarray) -> int:
    if not np.issubdtype(array.dtype, np.floating):
        return 0
    return int(array.size - np.count_nonzero(np.isfinite(array)))


class ScribbleDatastore(LocalDatastore):
    """LocalDatastore that checks every uploaded image and label before it stores it (see the module notes).

    Args:
        max_upload_mb: largest accepted upload in MiB.
        args, kwargs: those of ``LocalDatastore``.
    """

    def __init__(self, *args: Any, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, **kwargs: Any) -> None:
        self.max_upload_bytes = int(float(max_upload_mb) * 2**20)
        super().__init__(*args, **kwargs)

    def _check_size(self, path: str, what: str) -> None:
        size = os.path.getsize(path)
        if size > self.max_upload_bytes:
            raise _refuse(
                413,
                f"{what} {os.path.basename(path)!r} is {size / 2**20:.1f} MiB, over the server's limit of "
                f"{self.max_upload_bytes / 2**20:.0f} MiB (app option max_upload_mb)",
            )

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any] | None = None) -> str:
        """Check an uploaded image (name, size, readable, finite pixels), then store it as LocalDatastore does.

        Raises:
            HTTPException: 400 for an unsafe id, 413 over the size limit, 422 for an unreadable image or one with
                NaN / infinite pixels.
        """
        check_name("image id", image_id)
        self._check_size(image_filename, "image")
        try:
            image = read_image(image_filename)
        except ValueError as e:
            raise _refuse(422, str(e)) from e
        bad = _nonfinite(image.array)
        if bad:
            raise _refuse(422, f"image {image_id!r} has {bad} NaN or infinite pixel(s)")
        logger.info(f"Image {image_id} checked: shape {image.spatial_shape}")
        return super().add_image(image_id, image_filename, image_info or {})

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        """Check the upload, then store it as LocalDatastore does.

        Raises:
            HTTPException: 400 for an unsafe or unknown image id / tag or an unsupported file type, 413 over the
                size limit, 422 for a label that cannot be read, holds NaN or values no segment declares, or whose
                spatial shape differs from its image's.
        """
        check_name("image id", image_id)
        if label_tag:
            check_name("label tag", label_tag)
        if image_id not in self._datastore.objects:
            raise HTTPException(status_code=404, detail=f"refused: no image {image_id!r} in the datastore")
        name = os.path.basename(label_filename).lower()
        if not name.endswith(_LABEL_EXTENSIONS):
            raise HTTPException(
                status_code=400,
                detail=f"refused: label file type of {os.path.basename(label_filename)!r} is not one of "
                f"{', '.join(_LABEL_EXTENSIONS)}",
            )
        self._check_size(label_filename, "label")
        try:
            raw = read_image(label_filename).array
        except ValueError as e:
            raise _refuse(422, str(e)) from e
        bad = _nonfinite(raw)
        if bad:
            raise _refuse(422, f"label for {image_id!r} has {bad} NaN or infinite value(s); a label holds integers")
        image_path = self.get_image_uri(image_id)
        try:
            label = read_label(label_filename)
        except ValueError as e:
            raise HTTPException(status_code=422, detail=f"refused: {e}") from e
        image = read_image(image_path)
        if label.spatial_shape != image.spatial_shape:
            raise HTTPException(
                status_code=422,
                detail=f"refused: label shape {label.spatial_shape} differs from the shape of image {image_id!r} "
                f"{image.spatial_shape}",
            )
        declared = {0, *default_label_values(LABELS), *label_values_named((label_info or {}).get("label_info"))}
        undeclared = sorted(int(v) for v in np.unique(label.array) if int(v) not in declared)
        if undeclared:
            raise _refuse(
                422,
                f"label for {image_id!r} holds values {undeclared[:10]} that no segment declares; declared are "
                f"{sorted(declared)} (0 = not drawn; send label_info to name other values)",
            )
        logger.info(f"Label for {image_id} checked: shape {label.spatial_shape}")
        return super().save_label(image_id, label_filename, label_tag, label_info)
