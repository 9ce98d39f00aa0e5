"""Inference task: the bundle's network and preprocessing on one datastore image (2D) or volume (3D)."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import Inferer, SliceInferer
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from lib.bundle_config import LABELS, read_config
from lib.image_io import read_image, result_suffix, write_result
from s2l_monai.calibration import resolve_refinement, resolve_threshold
from s2l_monai.inferers import FlipAveragingInferer
from s2l_monai.transforms import MeanFieldRefined, SelectPercentiles

__all__ = ["ScribbleInferTask"]

logger = logging.getLogger(__name__)


class LoadForBundle:
    """Pre-transform: read the image and apply the bundle's own preprocessing.

    2D images go through ``load_transforms`` of ``configs/inference.json`` (PIL reader, channel handling, 1-99.8
    percentile scaling), exactly as the bundle's inference. Volumes are read whole (``ZYX``) and scaled slice by
    slice with the same percentiles, as the bundle does for slice items, giving ``C x Z x Y x X``.
    """

    def __init__(self, load_2d: Callable, in_channels: int) -> None:
        self.load_2d = load_2d
        self.in_channels = in_channels
        self.scale = SelectPercentiles(lower=1, upper=99.8, b_min=0.0, b_max=1.0, channel_wise=True)

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        path = data["image"]
        loaded = read_image(path)
        data["s2l_volume"] = loaded.volume
        data["s2l_geometry"] = loaded.geometry
        data["s2l_shape"] = loaded.spatial_shape
        if not loaded.volume:
            data["image"] = self.load_2d({"image": path})["image"]
            return data
        volume = torch.as_tensor(np.asarray(loaded.array, dtype=np.float32))
        volume = torch.as_tensor(self.scale(volume), dtype=torch.float32)[None]
        data["image"] = volume.repeat(self.in_channels, 1, 1, 1)
        return data


class ToLabel:
    """Post-transform: one uint8 class map (``HW`` or ``ZYX``; 1 = nucleus) from the network's logits, refined and
    read as the bundle's inference does: the boundary refinement and foreground threshold of the calibration
    training wrote beside ``model_path`` (:func:`s2l_monai.calibration.resolve_refinement` and
    :func:`~s2l_monai.calibration.resolve_threshold`, looked up on every call because training replaces the
    model), else the argmax. Volumes are refined slice by slice, as they are segmented."""

    def __init__(self, model_path: Path) -> None:
        self.model_path = model_path

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        pred = torch.as_tensor(data["pred"]).float().cpu()
        threshold = resolve_threshold("auto", self.model_path)
        refine_weight = resolve_refinement("auto", self.model_path)
        if pred.shape[0] == 2 and refine_weight > 0:
            refine = MeanFieldRefined("prob", weight=refine_weight, slice_axis=None if pred.ndim == 3 else 0)
            image = torch.as_tensor(data["image"]).float().cpu()
            pred = refine({"prob": torch.softmax(pred, dim=0), "image": image})["prob"].log()
        if threshold == 0.5 or pred.shape[0] != 2:
            label = torch.argmax(pred, dim=0)
        else:
            label = torch.softmax(pred, dim=0)[1] > threshold
        data["pred"] = label.cpu().numpy().astype(np.uint8)
        return data


class ScribbleInferTask(BasicInferTask):
    """Scribble2Label segmentation of nuclei for 2D images and (slice by slice) 3D volumes.

    The network, its preprocessing and the sliding-window settings come from the bundle's
    ``configs/inference.json``; the weights are ``<bundle>/models/model.pt`` (reloaded when training replaces it).
    The result is a label image of the input's size: PNG for 2D images, the volume's own format for volumes.

    Args:
        bundle: the bundle folder.
        dimension: 2 or 3, what viewers are told (both kinds of input are accepted either way).
    """

    def __init__(self, bundle: Path, dimension: int = 2) -> None:
        self.bundle = Path(bundle)
        parser = read_config(self.bundle, "inference.json", slice_axis=None, save_predictions=False)
        network = parser.get_parsed_content("network_def")
        self.load_transforms = parser.get_parsed_content("load_transforms")
        self.in_channels = int(parser.get_parsed_content("in_channels"))
        self.bundle_inferer = parser.get_parsed_content("inferer")
        self.test_time_flips = bool(parser.get_parsed_content("test_time_flips"))
        self.sw_batch_size = int(parser.get_parsed_content("sw_batch_size"))
        self.overlap = float(parser.get_parsed_content("overlap"))
        roi = [int(v) for v in parser.get_parsed_content("infer_roi_size")]
        super().__init__(
            path=str(self.bundle / "models" / "model.pt"),
            network=network,
            type=InferType.SEGMENTATION,
            labels=dict(LABELS),
            dimension=dimension,
            description="Scribble2Label nuclei segmentation (2D images; volumes slice by slice)",
            model_state_dict="model",
            roi_size=roi,
            load_strict=True,
        )

    def is_valid(self) -> bool:
        """Always listed, so that viewers offer the model before the first training (inference then explains)."""
        return True

    def _get_network(self, device: str, data: Any) -> Any:
        if not (self.bundle / "models" / "model.pt").is_file():
            raise MONAILabelException(
                MONAILabelError.INFERENCE_ERROR,
                f"no trained model yet ({self.bundle / 'models' / 'model.pt'}): save scribbles for some images and "
                "run training first",
            )
        return super()._get_network(device, data)

    def pre_transforms(self, data: Any = None) -> Sequence[Callable]:
        from monai.transforms import Compose

        return [LoadForBundle(Compose(self.load_transforms), self.in_channels)]

    def inferer(self, data: Any = None) -> Inferer:
        if data is not None and data.get("s2l_volume"):
            slices = SliceInferer(
                roi_size=self.roi_size,
                sw_batch_size=self.sw_batch_size,
                spatial_dim=0,
                overlap=self.overlap,
                mode="gaussian",
                padding_mode="replicate",
            )
            # the same flip averaging as the 2D task (test_time_flips), over H and W of every D slice
            return FlipAveragingInferer(slices, flips=((), (1,), (2,), (1, 2))) if self.test_time_flips else slices
        return self.bundle_inferer

    def post_transforms(self, data: Any = None) -> Sequence[Callable]:
        return [ToLabel(self.bundle / "models" / "model.pt")]

    def writer(self, data: dict[str, Any], extension: Any = None, dtype: Any = None) -> tuple[Any, Any]:
        """Write the class map in numpy orientation (no transposition), next to nothing in the datastore."""
        suffix = result_suffix(data["image_path"], bool(data.get("s2l_volume")))
        out = Path(tempfile.NamedTemporaryFile(suffix=suffix, delete=False).name)
        write_result(out, data["pred"], data.get("s2l_geometry"))
        pred = data["pred"]
        return str(out), {"shape": list(pred.shape), "nucleus_pixels": int(np.count_nonzero(pred == 1))}
