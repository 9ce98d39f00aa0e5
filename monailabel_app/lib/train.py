"""Training task: Scribble2Label from the scribbles saved in the datastore, no full labels needed.

MONAI Label's :class:`~monailabel.tasks.train.bundle.BundleTrainTask` runs the bundle's ``run`` with overrides;
this subclass only changes what it is given:

* the data: every image with a saved (final) label whose segments include scribbles; the label's values are
  mapped onto the bundle's scribble values (:mod:`lib.scribble_labels`) and written with a datalist into
  ``<bundle>/runs/monailabel/dataset``;
* no validation split (there is nothing to validate against without full labels);
* resuming: the network starts from the previous ``models/model.pt`` (MONAI Label's "pretrained" option, on by
  default) with a fresh optimiser and schedule; the first training, with no previous model, starts from the
  project's shipped weights where they fit (the bundle's ``pretrained_weights`` "auto"); "pretrained" off trains
  from scratch; the EMA pseudo-label store of earlier runs
  (``<bundle>/runs/monailabel/train/ema``, keyed by image id) is reused for every image whose content did not
  change (:func:`lib.training_set.refresh_ema_store`);
* several GPUs: MONAI Label's own ``multi_gpu`` / ``gpus`` options (on by default where the machine has more than
  one GPU) run the bundle under ``torchrun`` with ``configs/multi_gpu_train.json`` (``torchrun`` from PATH:
  ``start_server.sh`` puts the environment's first);
* Scribble2Label's hyper-parameters can be set per request. The bundle's schedule is a step budget
  (``max_steps``) with warm-up and ensembles as shares of it; MONAI Label's ``max_epochs`` option (and
  ``warmup_epochs``, ``ema_every``, ``ema_alpha``) override it in epochs when given (0 or empty: the bundle's own).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.tasks.train.bundle import BundleTrainTask

from lib.bundle_config import LABELS
from lib.training_set import LabelledImage, prepare_training_set, refresh_ema_store

__all__ = ["ScribbleTrainTask"]

logger = logging.getLogger(__name__)

#: Request keys passed to the bundle as top-level overrides, with their types.
HYPER_PARAMETERS: dict[str, type] = {
    "max_steps": int,
    "max_train_seconds": float,
    "warmup_share": float,
    "ensemble_share": float,
    "ema_memory_share": float,
    "tau": float,
    "lambda_up": float,
    "learning_rate": float,
    "batch_size": int,
    "num_samples": int,
    "num_workers": int,
    "seed": int,
    "in_channels": int,
}
#: The paper's epoch keys: overrides of the step schedule, passed only when a request sets them (``max_epochs`` 0
#: and empty values mean unset).
EPOCH_OVERRIDES: dict[str, type] = {"max_epochs": int, "warmup_epochs": int, "ema_every": int, "ema_alpha": float}


class ScribbleTrainTask(BundleTrainTask):
    """Train the Scribble2Label bundle on the datastore's scribble labels.

    Args:
        bundle: the bundle folder (weights go to ``<bundle>/models``).
        conf: the app's ``--conf`` options.
    """

    def __init__(self, bundle: Path, conf: dict[str, str]) -> None:
        super().__init__(str(bundle), conf, model_dict_key="model", load_strict=True)
        self.work_dir = Path(bundle) / "runs" / "monailabel"
        self._request: dict[str, Any] = {}
        self._dataset: tuple[Path, bool] | None = None
        self._start_from = "auto"

    def config(self) -> dict[str, Any]:
        """Options shown by viewers: MONAI Label's, the bundle's step budget and S2L's parameters; the epoch keys
        default to 0 (= use the step schedule)."""
        options = super().config()
        for key in ("val_split", "tracking", "tracking_uri", "tracking_experiment_name"):
            options.pop(key, None)
        for key in HYPER_PARAMETERS:
            options[key] = self.bundle_config.get_parsed_content(key)
        for key in EPOCH_OVERRIDES:
            options[key] = self.bundle_config.get_parsed_content(key)
        options["max_epochs"] = options["max_epochs"] or 0  # viewers send a number; 0 = the bundle's step budget
        return options

    def _fetch_datalist(self, request: dict[str, Any], datastore: Datastore) -> list[dict[str, Any]]:
        """The bundle items (``image``, ``scribble``, ``id``) of every image with a saved scribble label."""
        items = []
        for image_id in datastore.get_labeled_images(DefaultLabelTag.FINAL.value):
            items.append(
                LabelledImage(
                    id=image_id,
                    image=datastore.get_image_uri(image_id),
                    label=datastore.get_label_uri(image_id, DefaultLabelTag.FINAL.value),
                    label_info=datastore.get_label_info(image_id, DefaultLabelTag.FINAL.value) or {},
                )
            )
        logger.info(f"Images with a saved label: {[i.id for i in items]}")
        datalist, training, volumes = prepare_training_set(items, self.work_dir / "dataset", LABELS)
        self._dataset = (datalist, volumes)
        num_classes = int(self.bundle_config.get_parsed_content("num_classes"))
        refresh_ema_store(self.work_dir / "train" / "ema", training, num_classes)
        return training

    def _partition_datalist(self, datalist: list, request: dict[str, Any], shuffle: bool = False) -> tuple:
        return datalist, None

    def _load_checkpoint(self, model_pytorch: str, pretrained: bool, train_handlers: list) -> None:
        """Choose what the network starts from, as the bundle's ``pretrained_weights`` (its own ``CheckpointLoader``
        loads it; a second loader among the train handlers would race it): the previous model, else the shipped
        weights where they fit ("auto"); from scratch when "pretrained" is off."""
        if not pretrained:
            self._start_from = ""
            logger.info("Training from scratch (pretrained is off)")
        elif os.path.exists(model_pytorch):
            self._start_from = model_pytorch
            logger.info(f"Starting from the previous model: {model_pytorch}")
        else:
            self._start_from = "auto"
            logger.info("No previous model: starting from the shipped weights where they fit (pretrained_weights auto)")

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        self._request = dict(request)
        if not self._request.get("run_id"):
            self._request["run_id"] = "run"  # viewers send the option's empty default
        return super().__call__(self._request, datastore)

    def _update_overrides(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """Point the bundle at the prepared dataset instead of MONAI Label's ``train#dataset#data``."""
        if self._dataset is None:
            raise RuntimeError("the training set was not prepared")
        datalist, volumes = self._dataset
        overrides.pop(self.const.key_train_dataset_data(), None)
        overrides.pop(self.const.key_validate_dataset_data(), None)
        overrides.update(
            {
                "dataset_dir": str(datalist.parent),
                "datalist_name": datalist.name,
                "output_dir": str(self.work_dir / "train"),
                "ckpt_dir": str(Path(self.bundle_path) / "models"),
                "slice_axis": 0 if volumes else None,
                # the EMA store of unchanged images carries over from the previous training (refresh_ema_store)
                "reuse_ema_store": True,
                "pretrained_weights": self._start_from,
                # BundleTrainTask sets the trainer's epochs itself (50 by default); the schedule decides them here
                self.const.key_train_trainer_max_epochs(): "$@schedule.max_epochs",
            }
        )
        # as an expression: the multi-GPU path writes the overrides into a JSON config (a torch.device is not JSON);
        # there configs/multi_gpu_train.json gives each torchrun process its own device anyway
        device = overrides.get(self.const.key_device())
        if device is not None and not isinstance(device, str):
            overrides[self.const.key_device()] = f"$torch.device('{device}')"
        for key, cast in HYPER_PARAMETERS.items():
            if self._request.get(key) is not None:
                overrides[key] = cast(self._request[key])
        for key, cast in EPOCH_OVERRIDES.items():
            value = self._request.get(key)
            if value is None or value == "" or (key == "max_epochs" and not value):
                continue  # unset: the step schedule of the bundle
            overrides[key] = cast(value)
        logger.info(f"Bundle overrides: { {k: v for k, v in overrides.items() if k != 'train#handlers'} }")
        return overrides


