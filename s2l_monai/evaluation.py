"""Evaluation against full masks: the Ignite handler of ``configs/evaluate.json``, folder comparison, Otsu baseline.

* :class:`InstanceMetricsHandler` collects :func:`s2l_monai.metrics.evaluate_pair` records from a MONAI evaluator's
  post-processed outputs and writes ``metrics.csv``, ``summary.json`` and ``summary.md``
  (:func:`s2l_monai.metrics.write_reports`).
* :func:`evaluate_folders` compares instance label images already on disk (``s2l evaluate``), for segmentations
  made with other tools.
* :func:`otsu_baseline` is the no-learning baseline (``s2l otsu``): Otsu's threshold on the preprocessed grey image,
  then the same instance post-processing and metrics as the network.

Ground truth may be an instance label map or a binary mask; a binary mask becomes instances by connected components
(:func:`gt_instances`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.utils import min_version, optional_import
from skimage.filters import threshold_otsu
from skimage.measure import label as sk_label

from s2l_monai.inference_io import IMAGE_EXTENSIONS, image_stem, source_name, write_array
from s2l_monai.instances import instances_from_mask
from s2l_monai.metrics import evaluate_pair, summarise, write_reports

Events, _ = optional_import("ignite.engine", "0.5", min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", "0.5", min_version, "Engine")

__all__ = [
    "InstanceMetricsHandler",
    "evaluate_folders",
    "gt_instances",
    "labelled_items",
    "otsu_baseline",
    "otsu_foreground",
]

logger = logging.getLogger(__name__)


def _to_numpy(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def _channel_first_hw(value: Any, what: str) -> np.ndarray:
    """``1HW`` / ``CHW`` (channel first, first channel used) or ``HW`` -> ``HW`` numpy array."""
    arr = _to_numpy(value)
    if arr.ndim == 3:
        arr = arr[0]
    if arr.ndim != 2:
        raise ValueError(f"{what}: expected a 2D (1HW or HW) array, got shape {arr.shape}")
    return arr


def gt_instances(label: np.ndarray) -> np.ndarray:
    """Instance label map from a ground-truth file's array.

    An instance map (more than one distinct non-zero value) is kept as is. A binary mask (one non-zero value, e.g.
    0/1 or 0/255) becomes instances by connected components with 8-connectivity (``skimage.measure.label``), so
    touching nuclei in a binary mask count as one.

    Args:
        label: ``HW`` integer (or integer-valued float) array, background 0.

    Returns:
        ``HW`` int32 instance label map.
    """
    arr = np.asarray(label)
    if np.issubdtype(arr.dtype, np.floating):
        arr = np.rint(arr)
    arr = arr.astype(np.int64, copy=False)
    values = np.unique(arr[arr != 0])
    if values.size == 1:
        return sk_label(arr != 0, connectivity=arr.ndim).astype(np.int32)
    return arr.astype(np.int32)


def labelled_items(
    dataset_dir: str | os.PathLike, split: str = "test", filename: str = "datalist.json"
) -> list[dict[str, Any]]:
    """The items of a datalist split that carry a full mask (``label``).

    Args:
        dataset_dir: dataset folder holding the datalist, or the datalist file
            (see :func:`s2l_monai.data.datalist.load_datalist`).
        split: datalist section, e.g. ``"test"``.
        filename: datalist file name inside ``dataset_dir`` (config key ``datalist_name``).

    Returns:
        The items with a ``label`` (absolute paths).

    Raises:
        ValueError: no item of the split has a label.
    """
    from s2l_monai.data.datalist import load_datalist

    items = load_datalist(dataset_dir, split, filename=filename, required=("image",))
    labelled = [item for item in items if item.get("label")]
    if not labelled:
        raise ValueError(f"{dataset_dir}: no item of the {split!r} split has a 'label' (full mask) to evaluate against")
    if len(labelled) < len(items):
        logger.warning(f"{len(items) - len(labelled)} of {len(items)} {split!r} item(s) have no label; skipped.")
    return labelled


class InstanceMetricsHandler:
    """Ignite handler: per-image instance metrics from a MONAI evaluator's outputs, and the reports.

    Expects the evaluator to decollate (``decollate=True``, MONAI's default) and its post-processing to leave, per
    item, the semantic prediction (``semantic_key``, ``1HW`` class ids, foreground > 0), the instances
    (``instances_key``, ``1HW``) and the ground truth (``label_key``, ``1HW`` instance map or binary mask, see
    :func:`gt_instances`).

    * ``ITERATION_COMPLETED``: one :func:`~s2l_monai.metrics.evaluate_pair` record per item, named by the base name of
      the source image (``ref_key``'s ``filename_or_obj``).
    * ``EPOCH_COMPLETED``: the dataset summary (:func:`~s2l_monai.metrics.summarise`) goes into
      ``engine.state.metrics``, so a ``StatsHandler`` attached after this handler logs it.
    * ``COMPLETED``: ``metrics.csv``, ``summary.json`` and ``summary.md`` are written into ``output_dir``.

    Args:
        output_dir: folder for the reports; ``None`` writes none (records and summary stay on the handler).
        instances_key: key of the predicted instances.
        semantic_key: key of the semantic prediction; ``None`` uses ``instances > 0``.
        label_key: key of the ground truth.
        ref_key: key of the image whose metadata names the item.
        output_transform: maps ``engine.state.output`` to the list of item dicts (default: as is, plus a single dict
            wrapped in a list).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike | None,
        instances_key: str = "instances",
        semantic_key: str | None = "pred",
        label_key: str = "label",
        ref_key: str = "image",
        output_transform: Callable[[Any], Any] = lambda x: x,
    ) -> None:
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.instances_key = instances_key
        self.semantic_key = semantic_key
        self.label_key = label_key
        self.ref_key = ref_key
        self.output_transform = output_transform
        self.records: list[dict[str, Any]] = []
        self.summary: dict[str, Any] = {}

    def attach(self, engine: Engine) -> None:
        """Register the handler's events on ``engine``."""
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def reset(self, engine: Engine | None = None) -> None:
        """Forget the records of a previous epoch."""
        self.records = []
        self.summary = {}

    def iteration_completed(self, engine: Engine) -> None:
        """Score every item of the current batch."""
        output = self.output_transform(engine.state.output)
        items = [output] if isinstance(output, dict) else list(output)
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                raise TypeError(f"expected decollated item dicts, got {type(item).__name__} (use decollate=True)")
            try:
                name = source_name(item, self.ref_key)
                ref = item.get(self.ref_key)
                slice_index = getattr(ref, "meta", {}).get("slice_index")
                if slice_index is not None:  # a slice of a volume (s2l_monai.volumes.LoadVolumeSliced)
                    name = f"{name}_z{int(slice_index):04d}"
            except KeyError:
                batch = engine.state.batch
                name = str(batch[index].get("id", index)) if isinstance(batch, list) else str(index)
            self.records.append(self.score(item, name))

    def score(self, item: dict[str, Any], name: str) -> dict[str, Any]:
        """Metrics of one post-processed item.

        Args:
            item: dict with ``1HW`` ``instances_key``, ``label_key`` and (optionally) ``semantic_key``.
            name: name stored in the record.

        Returns:
            The :func:`~s2l_monai.metrics.evaluate_pair` record.
        """
        if self.label_key not in item:
            raise KeyError(f"{name}: no {self.label_key!r} in the evaluator output; is the label loaded?")
        pred = _channel_first_hw(item[self.instances_key], f"{name} {self.instances_key}").astype(np.int64)
        gt = gt_instances(_channel_first_hw(item[self.label_key], f"{name} {self.label_key}"))
        semantic = None
        if self.semantic_key is not None:
            semantic = _channel_first_hw(item[self.semantic_key], f"{name} {self.semantic_key}") > 0
        return evaluate_pair(pred, gt, semantic, name=name)

    def epoch_completed(self, engine: Engine) -> None:
        """Summarise the records into ``engine.state.metrics``."""
        self.summary = summarise(self.records)
        engine.state.metrics.update(self.summary)

    def completed(self, engine: Engine) -> None:
        """Write the reports."""
        if self.output_dir is None:
            return
        paths = write_reports(self.records, self.output_dir)
        logger.info(f"Wrote {paths['csv']}, {paths['json'].name} and {paths['md'].name} ({len(self.records)} images).")


def _index_folder(folder: Path, suffix: str = "") -> dict[str, Path]:
    """Map base name (``suffix`` removed) -> file, for the label images in a folder."""
    if not folder.is_dir():
        raise FileNotFoundError(f"folder {folder} does not exist")
    out: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith(".") or not path.name.lower().endswith(IMAGE_EXTENSIONS):
            continue
        stem = image_stem(path)
        if suffix:
            if not stem.endswith(suffix):
                continue
            stem = stem[: -len(suffix)]
        if stem in out:
            raise ValueError(f"{folder}: {out[stem].name} and {path.name} share the base name {stem!r}")
        out[stem] = path
    return out


def _read_hw(path: Path) -> np.ndarray:
    """Read a label image in numpy orientation as ``HW`` (first channel of a multi-channel file)."""
    from s2l_monai.data.folder import read_array

    arr = read_array(path)
    if arr.ndim == 3:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise ValueError(f"{path}: expected a 2D label image, got shape {arr.shape}")
    return arr


def evaluate_folders(
    pred_dir: str | os.PathLike,
    gt_dir: str | os.PathLike,
    pred_suffix: str = "_instances",
    semantic_suffix: str = "_semantic",
    require_all: bool = False,
) -> list[dict[str, Any]]:
    """Compare instance label images already on disk, paired by base name.

    Predictions are ``<name><pred_suffix>.*`` (e.g. ``x_instances.png`` as written by ``configs/inference.json``),
    ground truth ``<name>.*``; both may be instance maps or binary masks (binary: connected components, see
    :func:`gt_instances`). Where ``<name><semantic_suffix>.*`` exists beside the prediction, it is the semantic
    prediction for the IoU (as in ``configs/evaluate.json``); otherwise the IoU uses ``instances > 0``.

    Only names present on both sides are scored: a ground-truth folder usually holds the labels of every split while
    the predictions cover the test images. Unpaired files are logged as a warning; ``require_all`` makes a
    ground-truth image without a prediction an error instead.

    Args:
        pred_dir: folder of predictions.
        gt_dir: folder of ground-truth label images.
        pred_suffix: suffix of the prediction base names ("" for files named exactly like the ground truth).
        semantic_suffix: suffix of optional semantic masks ("" to ignore them).
        require_all: every ground-truth image must have a prediction.

    Returns:
        One :func:`~s2l_monai.metrics.evaluate_pair` record per pair, sorted by name.

    Raises:
        ValueError: no pair at all, or (with ``require_all``) ground-truth images without a prediction.
    """
    pred_root, gt_root = Path(pred_dir), Path(gt_dir)
    gts = _index_folder(gt_root)
    if not gts:
        raise ValueError(f"{gt_root}: no label images ({', '.join(IMAGE_EXTENSIONS)}) found")
    preds = _index_folder(pred_root, pred_suffix)
    semantics = _index_folder(pred_root, semantic_suffix) if semantic_suffix and semantic_suffix != pred_suffix else {}
    missing = sorted(set(gts) - set(preds))
    message = (
        f"{len(missing)} ground-truth image(s) in {gt_root} have no prediction '<name>{pred_suffix}.*' in "
        f"{pred_root}: " + ", ".join(missing[:20])
    )
    if missing and require_all:
        raise ValueError(message)
    if missing:
        logger.warning(message + " (not scored)")
    extra = sorted(set(preds) - set(gts))
    if extra:
        logger.warning(f"{len(extra)} prediction(s) without ground truth ignored: {', '.join(extra[:20])}")
    names = sorted(set(gts) & set(preds))
    if not names:
        raise ValueError(f"no prediction in {pred_root} ('<name>{pred_suffix}.*') matches a label image in {gt_root}")
    records = []
    for name in names:
        pred = gt_instances(_read_hw(preds[name]))
        semantic = _read_hw(semantics[name]) > 0 if name in semantics else None
        records.append(evaluate_pair(pred, gt_instances(_read_hw(gts[name])), semantic, name=name))
    return records


def otsu_foreground(image: np.ndarray) -> np.ndarray:
    """Foreground of a grey image by Otsu's threshold, polarity chosen by area.

    ``skimage.filters.threshold_otsu`` splits the grey levels in two; the foreground (nuclei) is the side with the
    smaller area: the bright side for fluorescence, the dark side for bright-field and H&E images, where nuclei are
    darker than the background. An image that is all one grey level has no foreground.

    Args:
        image: ``HW`` grey image (e.g. preprocessed to [0, 1]).

    Returns:
        ``HW`` boolean foreground mask.
    """
    img = np.asarray(image, dtype=np.float64)
    if img.size == 0 or img.min() == img.max():
        return np.zeros(img.shape, dtype=bool)
    bright = img > threshold_otsu(img)
    return ~bright if bright.mean() > 0.5 else bright


def otsu_baseline(
    items: Sequence[dict[str, Any]],
    instance_method: str = "watershed",
    min_size: int = 64,
    prediction_dir: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """The no-learning baseline: Otsu foreground, the network's instance post-processing, the same metrics.

    Each image gets the preprocessing of ``configs/inference.json`` (``LoadImaged`` with
    ``PILReader(reverse_indexing=False)``, RGB -> grey by luma with :class:`~s2l_monai.transforms.EnsureImageChannelsd`,
    percentile scaling 1..99.8 to [0, 1]; written here rather than read from the config so that the installed
    ``s2l`` command works without the bundle), then :func:`otsu_foreground` (the semantic prediction) and
    :func:`~s2l_monai.instances.instances_from_mask` (the instances).

    Args:
        items: datalist items with ``image`` and ``label`` paths.
        instance_method: ``"watershed"`` or ``"connected"``.
        min_size: objects under this many pixels are removed (64 in the paper).
        prediction_dir: if given, ``<name>_semantic.png`` (0/1) and ``<name>_instances.png`` (uint16) are written
            there, named like the outputs of ``configs/inference.json``.

    Returns:
        One :func:`~s2l_monai.metrics.evaluate_pair` record per item, named by the image's base name.
    """
    from monai.data import PILReader
    from monai.transforms import Compose, LoadImaged

    from s2l_monai.transforms import EnsureImageChannelsd, ScaleIntensityRangePercentilesd

    load = Compose(
        [
            LoadImaged(["image", "label"], reader=PILReader(reverse_indexing=False), image_only=True,
                       ensure_channel_first=True),
            EnsureImageChannelsd("image", channels=1),
            ScaleIntensityRangePercentilesd("image", 1, 99.8, 0.0, 1.0, channel_wise=True),
        ]
    )
    records = []
    for item in items:
        data = load({"image": item["image"], "label": item["label"]})
        name = image_stem(item["image"])
        semantic = otsu_foreground(_channel_first_hw(data["image"], name))
        instances = instances_from_mask(semantic, instance_method, min_size=min_size)
        if prediction_dir is not None:
            write_array(Path(prediction_dir) / f"{name}_semantic.png", semantic.astype(np.uint8))
            write_array(Path(prediction_dir) / f"{name}_instances.png", instances.astype(np.uint16))
        gt = gt_instances(_channel_first_hw(data["label"], f"{name} label"))
        records.append(evaluate_pair(instances, gt, semantic, name=name))
    return records
