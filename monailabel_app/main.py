"""MONAI Label app that serves the Scribble2Label bundle.

Start it with ``monailabel_app/start_server.sh STUDIES_DIR`` (see docs/monailabel.md). Options
(``--conf KEY VALUE``):

* ``max_upload_mb``: largest accepted image or label upload in MiB (default 1024).
* ``bundle``: the bundle folder (default ``<app>/model/scribble2label``, made from the repository's ``configs/``
  when missing; or extract a zoo package ``scribble2label_v<V>.zip`` there to start from its weights).

Tasks: inference ``scribble2label`` (2D images; volumes slice by slice) and ``scribble2label_3d`` (the same, listed
as a 3D model for viewers), ``scribble2label_uncertainty`` (where the last training is unsure, for an overlay), and
training ``scribble2label`` from the saved scribble labels. Next-sample strategies: ``uncertain`` (where to scribble
next, from the last training's ensemble; :mod:`lib.uncertainty`), ``random`` and ``first``.
"""

from __future__ import annotations

import logging
import os

import monailabel
from lib.bundle_config import BUNDLE_NAME, LABELS, ensure_bundle
from lib.datastore import DEFAULT_MAX_UPLOAD_MB, ScribbleDatastore
from lib.infer import ScribbleInferTask
from lib.train import ScribbleTrainTask
from lib.uncertainty import UncertainScribbles, UncertaintyMapTask
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

logger = logging.getLogger(__name__)


class MyApp(MONAILabelApp):
    """Scribble2Label: train from scribbles drawn in a viewer, segment every image."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.bundle = ensure_bundle(conf.get("bundle") or os.path.join(app_dir, "model", BUNDLE_NAME))
        logger.info(f"Scribble2Label bundle: {self.bundle}")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="Scribble2Label",
            description="Scribble-supervised nuclei segmentation (Scribble2Label bundle)",
            version=monailabel.__version__,
            labels=dict(LABELS),
        )

    def init_datastore(self) -> Datastore:
        from monailabel.config import settings

        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        return ScribbleDatastore(
            self.studies,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
            max_upload_mb=float(self.conf.get("max_upload_mb") or DEFAULT_MAX_UPLOAD_MB),
        )

    def init_infers(self) -> dict[str, InferTask]:
        return {
            BUNDLE_NAME: ScribbleInferTask(self.bundle, dimension=2),
            f"{BUNDLE_NAME}_3d": ScribbleInferTask(self.bundle, dimension=3),
            f"{BUNDLE_NAME}_uncertainty": UncertaintyMapTask(self.bundle),
        }

    def init_trainers(self) -> dict[str, TrainTask]:
        return {BUNDLE_NAME: ScribbleTrainTask(self.bundle, self.conf)}

    def init_strategies(self) -> dict[str, Strategy]:
        return {"uncertain": UncertainScribbles(self.bundle), "random": Random(), "first": First()}
