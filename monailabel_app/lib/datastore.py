"""A local datastore that checks a label before it stores it.

MONAI Label's :class:`~monailabel.datastore.local.LocalDatastore` copies whatever is uploaded to
``labels/<tag>/<image id><ext>``: a tag such as ``../../x`` writes outside the studies folder, and a label of the
wrong size is only noticed when training fails. Here every upload is checked first and refused with an HTTP 4xx
and a message that says what is wrong; a refused upload leaves the datastore unchanged.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

from fastapi import HTTPException
from monailabel.datastore.local import LocalDatastore

from lib.image_io import read_image, read_label

__all__ = ["ScribbleDatastore", "check_name"]

logger = logging.getLogger(__name__)

#: Tags and image ids: letters, digits, ``.``, ``_``, ``-`` (no path separators, no ``..``).
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,199}$")
_LABEL_EXTENSIONS = (".png", ".tif", ".tiff", ".nii", ".nii.gz", ".nrrd", ".mha")


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


class ScribbleDatastore(LocalDatastore):
    """LocalDatastore whose ``save_label`` refuses unsafe names, unreadable labels and labels of the wrong shape."""

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        """Check the upload, then store it as LocalDatastore does.

        Raises:
            HTTPException: 400 for an unsafe or unknown image id / tag or an unsupported file type, 422 for a label
                that cannot be read or whose spatial shape differs from its image's.
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
        logger.info(f"Label for {image_id} checked: shape {label.spatial_shape}")
        return super().save_label(image_id, label_filename, label_tag, label_info)
