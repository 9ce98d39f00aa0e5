"""Where to scribble next, for MONAI Label: a next-sample strategy and the uncertainty map as an inference output.

Both read what the last training's ensemble wrote into ``<bundle>/runs/monailabel/train/uncertainty``
(:mod:`s2l_monai.uncertainty`: per image the share of unscribbled pixels the pseudo-labels cannot decide, and the
uint8 map). Nothing runs the network.

* :class:`UncertainScribbles` (strategy ``uncertain``, Slicer's "Next Sample"): an image nobody has scribbled yet
  comes first (the model has learnt nothing from it; datastore order); when every image has scribbles, or with
  ``{"scribbled_only": true}``, the scribbled image whose last ensemble left the largest uncertain share.
* :class:`UncertaintyMapTask` (model ``scribble2label_uncertainty``): the map of a scribbled image, 0-255 (255 = most
  unsure) in the image's frame, for a viewer to overlay; an image without one gets HTTP 404 with the reason.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import HTTPException
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.interfaces.tasks.strategy import Strategy

from lib.image_io import read_image, result_suffix, write_result
from s2l_monai.suggestions import load_summary, rank_items
from s2l_monai.uncertainty import read_map

__all__ = ["UncertainScribbles", "UncertaintyMapTask", "uncertainty_dir"]

logger = logging.getLogger(__name__)


def uncertainty_dir(bundle: str | Path) -> Path:
    """Where the app's trainings (:class:`lib.train.ScribbleTrainTask`) write their uncertainty maps."""
    return Path(bundle) / "runs" / "monailabel" / "train" / "uncertainty"


def _summary(bundle: Path) -> tuple[dict[str, Any], Path] | None:
    try:
        return load_summary(uncertainty_dir(bundle))
    except FileNotFoundError:
        return None


class UncertainScribbles(Strategy):
    """Next sample: an unscribbled image first, then the scribbled image with the most uncertainty left.

    Args:
        bundle: the bundle folder the app trains.
    """

    def __init__(self, bundle: str | Path) -> None:
        super().__init__("Where to scribble next: an image without scribbles, else the one the last training is "
                         "least sure about (share of undecided unscribbled pixels)")
        self.bundle = Path(bundle)

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any] | None:
        scribbled_only = str(request.get("scribbled_only", "")).lower() in ("1", "true", "yes")
        if not scribbled_only:
            unlabelled = sorted(datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels")))
            if unlabelled:
                logger.info(f"uncertain: {unlabelled[0]} has no scribbles yet")
                return {"id": unlabelled[0], "reason": "no scribbles yet"}
        found = _summary(self.bundle)
        if found is None:
            logger.info("uncertain: no training has run an ensemble yet")
            return None
        summary, _ = found
        images = set(datastore.list_images())
        for entry in rank_items(summary):
            if entry["id"] in images:
                where = "" if entry.get("slice") is None else f", slice {entry['slice']}"
                logger.info(f"uncertain: {entry['id']}{where}, {100 * entry['uncertain_share']:.1f}% uncertain")
                return {"id": entry["id"], "slice": entry.get("slice"), "uncertain_share": entry["uncertain_share"],
                        "mean_uncertainty": entry["mean"], "epoch": summary.get("epoch"),
                        "reason": "most uncertainty left by the last training"}
        return None


class UncertaintyMapTask(InferTask):
    """The last ensemble's uncertainty map of a scribbled image, as a label image (0-255) of the image's size.

    Args:
        bundle: the bundle folder the app trains.
        dimension: 2 or 3, what viewers are told.
    """

    def __init__(self, bundle: str | Path, dimension: int = 2) -> None:
        super().__init__(type=InferType.OTHERS, labels={"uncertainty": 255}, dimension=dimension,
                         description="Where the last training is unsure (0 = sure, 255 = undecided); scribbled "
                                     "images only, no network pass")
        self.bundle = Path(bundle)

    def is_valid(self) -> bool:
        return True

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        request["save_label"] = False  # a map to look at, never the image's label
        image = str(Path(request["image"]).resolve())
        found = _summary(self.bundle)
        entries = [] if found is None else [e for e in found[0]["items"] if e.get("image") == image]
        if not entries:
            # an HTTP error with its reason (MONAI Label answers other exceptions of a task with a bare 500)
            raise HTTPException(
                status_code=404,
                detail=f"no uncertainty map for {Path(image).name}: only images with saved scribbles get one, from "
                "the ensembles of a training (train first)",
            )
        summary, folder = found
        # a 2D image: its packed map; a volume: its DHW map file
        stored = np.array(read_map(folder, entries[0]) if entries[0].get("slice") is None
                          else np.load(folder / entries[0]["map"]))
        loaded = read_image(image)
        out = Path(tempfile.NamedTemporaryFile(suffix=result_suffix(image, loaded.volume), delete=False).name)
        write_result(out, stored, loaded.geometry)
        shares = {str(e["slice"]) if e.get("slice") is not None else "image": e["uncertain_share"] for e in entries}
        return str(out), {"epoch": summary.get("epoch"), "threshold": summary.get("threshold"),
                          "uncertain_share": shares, "shape": list(stored.shape)}
