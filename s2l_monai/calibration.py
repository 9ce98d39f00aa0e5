"""The foreground threshold a trained model should be read with, chosen without labels: where its outlines sit on
the image's edges.

A network trained on scribbles never sees a nucleus boundary: strokes run along nucleus centres and through the
background, so where its foreground probability crosses 0.5 is an extrapolation, and it is biased in a way that
depends on the data. Measured on the DSB2018 validation splits (Scribble2Label, default recipe, 30% scribbles;
``docs/configuration.md``, "The foreground threshold"): fluorescence and H&E masks come out too tight (IoU best at
a threshold near 0.3 / 0.2, +0.009 / +0.012 over 0.5), bright-field masks too wide (best near 0.7-0.8, +0.017 to
+0.038). No single fixed threshold serves all three.

The boundary annotators draw is where the intensity changes fastest. So, over a set of images the model segments,
the outline of ``p > t`` (the mask's inner boundary pixels) is scored by the mean Gaussian gradient magnitude of
the image under it, for every ``t`` of a grid; the chosen threshold is the one whose outlines lie on the strongest
edges, averaged over the images:

    t* = argmax_t  mean_i  mean_{x in boundary(p_i > t)} |grad (G_sigma * I_i)|(x)

It needs no labels and no extra training: after training, ``configs/train.json`` runs it once on (up to
:data:`MAX_ITEMS`) training images through the ensemble's inferer and writes ``<model>.calibration.json`` next to
``model.pt``; ``configs/inference.json``'s ``foreground_threshold`` ``"auto"`` reads it (0.5, the argmax, where there
is none, e.g. for weights trained before it existed).

The probabilities scored are those inference thresholds: refined against the image by a few mean-field CRF steps
(:func:`s2l_monai.crf.mean_field_refine`, ``refine_weight``), so the record also names the refinement it was
chosen with, and ``configs/inference.json``'s ``refine_weight`` ``"auto"`` applies the same (none where the record
has none, e.g. weights calibrated before refinement existed).

It is meant for objects on a background. Where the foreground fills most of the image (cells between thin
membranes, ISBI EM: 70% by the scribbles' class-prior estimate), a lower threshold closes the gaps between objects
while their outer outlines still sit on edges: on ISBI EM validation the criterion chose 0.2, IoU 0.880 -> 0.878 but
DSB score 0.284 -> 0.124 (the cells merge). So above :data:`MAX_FOREGROUND_SHARE` (the same rule that decides
whether training starts from the shipped nuclei weights) the record says 0.5 and why, and no refinement: it
was chosen on objects on a background, and on ISBI EM validation (seed 0, at 0.5) it is neutral, IoU 0.8796 ->
0.8803, DSB score 0.284 -> 0.283.

Neither MONAI nor scikit-image choose a probability threshold from image edges (``skimage.filters`` thresholds
intensities, not a model's probabilities), hence this module.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage as ndi

from s2l_monai.crf import mean_field_refine
from s2l_monai.errors import ConfigError
from s2l_monai.pretrained import MAX_FOREGROUND_SHARE  # one rule for "objects on a background", shared with the start

__all__ = [
    "DEFAULT_REFINE_WEIGHT",
    "DEFAULT_THRESHOLD",
    "MAX_FOREGROUND_SHARE",
    "MAX_ITEMS",
    "THRESHOLDS",
    "ThresholdCalibration",
    "calibrate_after_training",
    "calibrate_model",
    "calibration_path",
    "choose_threshold",
    "edge_alignment",
    "resolve_refinement",
    "resolve_threshold",
]

logger = logging.getLogger("s2l")

#: The argmax of a two-class softmax, used where no calibration exists.
DEFAULT_THRESHOLD = 0.5
#: Candidate thresholds: 0.2 .. 0.8 in steps of 0.05 (beyond that the masks lose whole nuclei or merge them).
THRESHOLDS = tuple(round(0.2 + 0.05 * i, 2) for i in range(13))
#: Strength of the mean-field refinement a calibration is made with (``refine_weight`` of ``configs/train.json``).
DEFAULT_REFINE_WEIGHT = 2.0
#: Images looked at after training, evenly spaced over the training list (7.9 s for 64 DSB-Fluo images on 2 CPU cores).
MAX_ITEMS = 64


def _grey(image: np.ndarray) -> np.ndarray:
    """``HW`` grey image from ``HW`` / ``CHW`` (channels averaged)."""
    image = np.asarray(image, dtype=np.float32)
    return image.mean(axis=0) if image.ndim == 3 else image


def edge_alignment(
    probability: np.ndarray, image: np.ndarray, thresholds: Sequence[float] = THRESHOLDS, sigma: float = 1.0
) -> np.ndarray:
    """Mean image-gradient magnitude under the outline of ``probability > t``, for every ``t``.

    Args:
        probability: ``HW`` foreground probability.
        image: ``HW`` or ``CHW`` image the probability was predicted from (channels are averaged).
        thresholds: the candidate thresholds ``t``.
        sigma: scale of the Gaussian derivative, pixels (``scipy.ndimage.gaussian_gradient_magnitude``).

    Returns:
        ``float64`` array, one value per threshold: the mean of ``|grad (G_sigma * I)|`` over the mask's inner
        boundary pixels (foreground pixels with a background 4-neighbour); NaN where the mask is empty or fills
        the image.
    """
    prob = np.asarray(probability, dtype=np.float32)
    grey = _grey(image)
    if grey.shape != prob.shape:
        raise ValueError(f"image shape {grey.shape} differs from the probability's {prob.shape}")
    gradient = ndi.gaussian_gradient_magnitude(grey, sigma)
    scores = np.full(len(thresholds), np.nan)
    for k, t in enumerate(thresholds):
        mask = prob > t
        # border_value=1: the image border is not an outline (a nucleus cut by the border has no edge there)
        outline = mask & ~ndi.binary_erosion(mask, border_value=1)
        if outline.any():
            scores[k] = float(gradient[outline].mean())
    return scores


def choose_threshold(
    curves: Sequence[np.ndarray] | np.ndarray, thresholds: Sequence[float] = THRESHOLDS
) -> tuple[float, np.ndarray]:
    """The threshold whose outlines lie on the strongest edges, averaged over images.

    Images are averaged with equal weight (a large image does not outvote many small ones). Only images with an
    outline at every threshold count, so that every candidate is scored on the same images; where no image has
    one at every threshold, each threshold's mean is over the images that have one.

    Args:
        curves: one :func:`edge_alignment` result per image (``N x T``).
        thresholds: the thresholds the curves were computed for.

    Returns:
        ``(threshold, score)``: the chosen threshold (:data:`DEFAULT_THRESHOLD` if no image has an outline) and
        the averaged curve (``T``).
    """
    table = np.asarray(curves, dtype=np.float64).reshape(-1, len(thresholds))
    complete = table[~np.isnan(table).any(axis=1)]
    if len(complete):
        score = complete.mean(axis=0)
    elif (~np.isnan(table)).any():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # thresholds that no image has an outline at: NaN
            score = np.nanmean(table, axis=0)
    else:
        return DEFAULT_THRESHOLD, np.full(len(thresholds), np.nan)
    finite = np.where(np.isnan(score), -np.inf, score)
    best = finite.max()
    # ties (flat curves): the candidate closest to the argmax
    tied = [k for k in range(len(thresholds)) if finite[k] >= best - 1e-12]
    k = min(tied, key=lambda i: abs(thresholds[i] - DEFAULT_THRESHOLD))
    return float(thresholds[k]), score


def calibration_path(model_path: str | os.PathLike) -> Path:
    """Where a model's calibration is kept: ``models/model.pt`` -> ``models/model.calibration.json``."""
    path = Path(model_path)
    return path.with_name(path.stem + ".calibration.json")


def resolve_threshold(value: Any, model_path: str | os.PathLike | None = None) -> float:
    """The ``foreground_threshold`` of ``configs/inference.json``: a number in (0, 1), or ``"auto"``.

    ``"auto"`` reads ``<model>.calibration.json`` next to ``model_path`` (written after training) and falls back to
    :data:`DEFAULT_THRESHOLD` (the argmax) where there is none.

    Raises:
        ConfigError: a number outside (0, 1), another string, or an unreadable calibration file (named).
    """
    if isinstance(value, str) and value.strip().lower() == "auto":
        path = calibration_path(model_path) if model_path else None
        if path is None or not path.is_file():
            logger.info("foreground threshold %.2f (the argmax): no calibration next to %s", DEFAULT_THRESHOLD,
                        model_path)
            return DEFAULT_THRESHOLD
        threshold = float(_read_record(path)["foreground_threshold"])
        if not 0.0 < threshold < 1.0:
            raise ConfigError(f"{path}: foreground_threshold {threshold} is not in (0, 1).")
        logger.info("foreground threshold %.2f, calibrated after training (%s)", threshold, path)
        return threshold
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"foreground_threshold must be 'auto' or a number in (0, 1), got {value!r}.") from None
    if not 0.0 < threshold < 1.0 or math.isnan(threshold):
        raise ConfigError(f"foreground_threshold must be in (0, 1), got {value!r}.")
    return threshold


def _read_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
        float(record["foreground_threshold"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path}: not a calibration file ({err}); delete it or set foreground_threshold.") from None
    return record


def resolve_refinement(value: Any, model_path: str | os.PathLike | None = None) -> float:
    """The ``refine_weight`` of ``configs/inference.json``: a number >= 0 (0 = no refinement), or ``"auto"``.

    ``"auto"`` reads the refinement the model's threshold was calibrated with from ``<model>.calibration.json``
    (``refine_weight``); 0 where there is no calibration or it has none (calibrated before refinement existed, or
    not objects on a background).

    Raises:
        ConfigError: a negative number, another string, or an unreadable calibration file (named).
    """
    if isinstance(value, str) and value.strip().lower() == "auto":
        path = calibration_path(model_path) if model_path else None
        if path is None or not path.is_file():
            return 0.0
        weight = _read_record(path).get("refine_weight", 0.0)
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: refine_weight {weight!r} is not a number.") from None
        if weight > 0:
            logger.info("boundary refinement: mean-field CRF, weight %.2f, as calibrated (%s)", weight, path)
        return max(weight, 0.0)
    try:
        weight = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"refine_weight must be 'auto' or a number >= 0, got {value!r}.") from None
    if not weight >= 0.0:
        raise ConfigError(f"refine_weight must be >= 0, got {value!r}.")
    return weight


class ThresholdCalibration:
    """Choose and record a trained model's foreground threshold from its own predictions on unlabelled images.

    Args:
        network: the trained two-class network (``B2HW`` logits).
        inferer: MONAI inferer that maps a ``B C H W`` image batch to logits (the ensemble's: whole image or
            sliding window).
        device: device of the network.
        thresholds: candidate thresholds.
        max_items: images looked at, evenly spaced over the dataset.
        flips: average the four flips of every image, as the default inference does (``test_time_flips``).
        refine_weight: refine the probabilities with :func:`s2l_monai.crf.mean_field_refine` at this weight before
            scoring them, as inference does (0 = none); written to the record.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        inferer: Any,
        device: torch.device | str = "cpu",
        thresholds: Sequence[float] = THRESHOLDS,
        max_items: int = MAX_ITEMS,
        flips: bool = True,
        refine_weight: float = DEFAULT_REFINE_WEIGHT,
    ) -> None:
        from s2l_monai.inferers import FlipAveragingInferer

        self.network = network
        self.inferer = FlipAveragingInferer(inferer) if flips else inferer
        self.device = torch.device(device)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.max_items = int(max_items)
        self.refine_weight = float(refine_weight)

    def curves(self, dataset: Any) -> np.ndarray:
        """:func:`edge_alignment` of up to ``max_items`` items of ``dataset`` (dicts with ``"image"`` ``CHW``)."""
        n = len(dataset)
        picks = np.unique(np.linspace(0, n - 1, min(n, self.max_items)).round().astype(int)) if n else []
        rows = []
        was_training = self.network.training
        self.network.eval()
        try:
            with torch.no_grad():
                for i in picks:
                    image = torch.as_tensor(np.asarray(dataset[int(i)]["image"]), dtype=torch.float32)
                    logits = self.inferer(image[None].to(self.device), self.network)
                    prob = torch.softmax(logits.float(), dim=1).cpu()
                    prob = mean_field_refine(prob, image[None], self.refine_weight)[0, 1].numpy()
                    rows.append(edge_alignment(prob, image.numpy(), self.thresholds))
        finally:
            self.network.train(was_training)
        return np.asarray(rows, dtype=np.float64).reshape(-1, len(self.thresholds))

    def __call__(self, dataset: Any, model_path: str | os.PathLike | None = None) -> dict[str, Any]:
        """Choose the threshold on ``dataset``; with ``model_path``, write it to its :func:`calibration_path`.

        Returns:
            The record written: ``foreground_threshold``, ``items``, ``thresholds``, ``edge_score`` (the averaged
            curve), ``method``.
        """
        curves = self.curves(dataset)
        threshold, score = choose_threshold(curves, self.thresholds)
        record = {
            "foreground_threshold": threshold,
            "items": int(len(curves)),
            "thresholds": list(self.thresholds),
            "edge_score": [None if np.isnan(v) else round(float(v), 6) for v in score],
            "refine_weight": self.refine_weight,
            "method": "mean image-gradient magnitude under the outline of p > t, averaged over training images "
                      "(s2l_monai.calibration)",
        }
        logger.info("foreground threshold %.2f: the outlines of p > t lie on the strongest image edges there "
                    "(%d training images, refinement weight %g; 0.5 = argmax)", threshold, len(curves),
                    self.refine_weight)
        if model_path is not None:
            _write(record, model_path)
        return record


def _write(record: dict[str, Any], model_path: str | os.PathLike) -> None:
    path = calibration_path(model_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)  # atomic: an interrupted write leaves the previous calibration


def not_objects_on_a_background(model_path: str | os.PathLike | None, foreground_share: float) -> dict[str, Any]:
    """The record for data whose foreground fills most of the image: the argmax, and why (module notes)."""
    reason = (f"the scribbles put about {100 * foreground_share:.0f}% of the pixels in the foreground (more than "
              f"{100 * MAX_FOREGROUND_SHARE:.0f}%): not objects on a background, where a threshold below 0.5 would "
              "merge neighbouring objects; read at the argmax")
    record = {"foreground_threshold": DEFAULT_THRESHOLD, "items": 0, "not_calibrated": reason, "refine_weight": 0.0,
              "method": "s2l_monai.calibration"}
    logger.info("foreground threshold %.2f: %s", DEFAULT_THRESHOLD, reason)
    if model_path is not None:
        _write(record, model_path)
    return record


def calibrate_after_training(
    network: torch.nn.Module,
    dataset: Any,
    inferer: Any,
    device: torch.device | str,
    model_path: str | os.PathLike,
    enabled: Any = True,
    foreground_share: float | None = None,
    flips: Any = True,
    refine_weight: float = DEFAULT_REFINE_WEIGHT,
) -> dict[str, Any] | None:
    """The last training step of ``configs/train.json``: :class:`ThresholdCalibration` on the training images, written
    next to ``model_path``. ``enabled`` false (``calibrate_threshold false``) skips it and removes a stale file, so
    inference falls back to the argmax. ``foreground_share`` (the scribbles' class-prior estimate) above
    :data:`MAX_FOREGROUND_SHARE` records the argmax and why. ``refine_weight``: the boundary refinement calibrated
    with (and recorded for inference's ``refine_weight`` ``"auto"``)."""
    from s2l_monai.inference_io import as_bool

    if not as_bool(enabled):
        stale = calibration_path(model_path)
        if stale.is_file():
            stale.unlink()
        return None
    if not Path(model_path).is_file():
        return None  # nothing was trained (e.g. an interrupted run)
    if foreground_share is not None and foreground_share > MAX_FOREGROUND_SHARE:
        return not_objects_on_a_background(model_path, foreground_share)
    return ThresholdCalibration(network, inferer, device, flips=as_bool(flips),
                                refine_weight=float(refine_weight))(dataset, model_path)


def calibrate_model(
    model_path: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    datalist_name: str = "datalist.json",
    configs_dir: str | os.PathLike | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Calibrate a saved ``model.pt`` (e.g. one trained before calibration existed) on a dataset's training images,
    with the network, preprocessing and inferer of ``configs/train.json`` (``s2l calibrate``).

    Args:
        model_path: the weights (a state dict, or a checkpoint dict with ``"model"``); the result is written next
            to it.
        dataset_dir: the dataset folder holding the datalist.
        datalist_name: the datalist's file name.
        configs_dir: the bundle's ``configs/`` (default: the one beside this package, else ``./configs``).
        **overrides: further config keys, e.g. ``in_channels=3`` or ``slice_axis=0``.

    Raises:
        ConfigError: the weights do not exist.
    """
    from monai.bundle import ConfigParser

    model_path = Path(model_path)
    if not model_path.is_file():
        raise ConfigError(f"{model_path}: no such model file.")
    configs = Path(configs_dir) if configs_dir else Path(__file__).resolve().parents[1] / "configs"
    if not (configs / "train.json").is_file():
        configs = Path("configs").resolve()
    parser = ConfigParser()
    parser.read_config(str(configs / "train.json"))
    parser.update({"dataset_dir": str(dataset_dir), "datalist_name": datalist_name, "pretrained_weights": "",
                   "output_dir": str(model_path.parent), **overrides})
    network = parser.get_parsed_content("network")
    device = parser.get_parsed_content("device")
    state = torch.load(model_path, map_location=device, weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    network.load_state_dict(state)
    dataset = parser.get_parsed_content("ensemble#dataset")
    inferer = parser.get_parsed_content("ensemble#inferer")
    from s2l_monai.data.balance import class_prior

    share = class_prior(dataset, int(parser.get_parsed_content("unlabelled"))).image_foreground_share
    if share > MAX_FOREGROUND_SHARE:
        return not_objects_on_a_background(model_path, share)
    refine_weight = float(parser.get_parsed_content("refine_weight"))
    return ThresholdCalibration(network, inferer, device, refine_weight=refine_weight)(dataset, model_path)
